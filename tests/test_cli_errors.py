"""No silent failures, by class: unknown flags refused before anything runs, --help that lists the command's own
flags, one-line errors instead of tracebacks for paths that cannot work, batch answers that record how they were
made, prompts too long for the window refused."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, SAMPLE, TINY, write_jsonl
from sftkit.errors import UserError


def script(name, *args, **kw):
    return subprocess.run([sys.executable, str(ROOT / name), *args], capture_output=True, text=True, timeout=300,
                          **kw)


@pytest.mark.parametrize("cmd, typo, closest", [
    (["train_unsloth.py", "--model_name", TINY, "--dataset", SAMPLE], "--max_step", "--max_steps"),
    (["infer.py", "--model_name", TINY, "--instruction", "안녕"], "--max_new_token", "--max_new_tokens"),
    (["memory_report.py", "estimate"], "--seq_len", "--max_seq_length"),
    (["train_unsloth.py"], "--learning-rat=1e-4", "--learning_rate"),  # Fire's dashes and =VALUE too
])
def test_an_unknown_flag_is_refused_before_anything_runs(tmp_path, cmd, typo, closest):
    done = script(*cmd, typo, "2", cwd=tmp_path)
    assert done.returncode == 2 and f"did you mean {closest}?" in done.stderr and "Nothing was run" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "outputs").exists()  # nothing trained, nothing made


def test_help_lists_the_commands_own_flags_not_fires():
    done = script("train_unsloth.py", "--help")
    assert done.returncode == 0 and "--max_steps INT (default: 60)" in done.stdout
    assert "optimizer steps to run" in done.stdout and "GROUP" not in done.stdout and "COMMAND" not in done.stdout
    sub = script("memory_report.py", "--help")
    assert sub.returncode == 0 and "estimate" in sub.stdout and "show" in sub.stdout
    typo = script("memory_report.py", "shwo", "outputs/x")
    assert typo.returncode == 2 and "did you mean 'show'?" in typo.stderr


def test_a_value_without_its_flag_is_refused(tmp_path):
    done = script("infer.py", "--model_name", TINY, "안녕하세요", "--instruction", "x", cwd=tmp_path)
    # Fire would quietly take the stray word as the first argument (--adapter).
    assert done.returncode == 2 and "'안녕하세요' has no flag in front of it" in done.stderr
    assert "Traceback" not in done.stderr
    switch = script("train_unsloth.py", "--packing", "maybe", cwd=tmp_path)  # a switch given a word: the switch
    assert switch.returncode == 2 and "--packing is a switch" in switch.stderr and "'maybe' is neither" in \
        switch.stderr
    varargs = script("memory_report.py", "compare", "--format", "csv", cwd=tmp_path)  # takes run folders only
    assert varargs.returncode == 2 and "this command takes no flags, only its values" in varargs.stderr
    assert "Known flags: --." not in varargs.stderr


def test_output_folders_that_cannot_work_are_one_line_errors(tmp_path):
    from train_unsloth import train

    a_file = tmp_path / "taken"
    a_file.write_text("mine")
    with pytest.raises(UserError, match="is a file, not a folder"):
        train(model_name=TINY, dataset=SAMPLE, output_dir=str(a_file), max_steps=1)
    assert a_file.read_text() == "mine"
    with pytest.raises(UserError, match="cannot be written"):
        train(model_name=TINY, dataset=SAMPLE, output_dir=str(a_file / "under" / "it"), max_steps=1)
    if os.geteuid() != 0:  # root writes anywhere: the read-only case cannot be shown as root
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(UserError, match="cannot be written"):
            train(model_name=TINY, dataset=SAMPLE, output_dir=str(ro / "run"), max_steps=1)


def test_infer_paths_that_cannot_work_are_refused_before_loading(tmp_path, tiny_run, no_model_load):
    from infer import infer

    src = write_jsonl(tmp_path / "q.jsonl", [{"instruction": "안녕"}])
    with pytest.raises(UserError, match="is a folder; pass a file in it"):
        infer(adapter=tiny_run, input_file=src, output_file=str(tmp_path))
    with pytest.raises(UserError, match="does not exist. Create it"):
        infer(adapter=tiny_run, input_file=src, output_file=str(tmp_path / "missing" / "a.jsonl"))
    bare = tmp_path / "no-weights"
    bare.mkdir()
    for name in ("run.json", "adapter_config.json"):
        (bare / name).write_bytes((Path(tiny_run) / name).read_bytes())
    # What to do depends on how the run ended: never advise a --resume that train_unsloth.py would refuse.
    record = json.loads((bare / "run.json").read_text())
    for status, ckpt, fix in (("finished", False, "moved or deleted.*--overwrite"), ("running", False,
                              "still training, or was killed.*--overwrite"), ("failed", False,
                              "before saving a checkpoint.*--overwrite"), ("interrupted", True, "--resume")):
        (bare / "run.json").write_text(json.dumps({**record, "status": status}))
        if ckpt:
            shutil.copytree(next(Path(tiny_run).glob("checkpoint-*")), bare / "checkpoint-10")
        with pytest.raises(UserError, match=f"no adapter .*{fix}"):
            infer(adapter=str(bare), instruction="안녕")


def test_damaged_adapter_files_are_named_before_the_model_loads(tiny_run, tmp_path):
    """A cut-off adapter_model.safetensors or a broken adapter_config.json (a copy cut short, an edit gone wrong)
    is named with the fix, before the base model loads; peft and safetensors failed with tracebacks after it."""
    from infer import infer

    for name, damage, said in (("adapter_config.json", lambda b: b"{bad", "adapter_config.json is damaged"),
                               ("adapter_model.safetensors", lambda b: b[:len(b) // 2], "cut off or damaged")):
        run = tmp_path / name
        shutil.copytree(tiny_run, run)
        (run / name).write_bytes(damage((run / name).read_bytes()))
        with pytest.raises(UserError, match=f"{said}.*--overwrite --output_dir {run}"):
            infer(adapter=str(run), instruction="안녕")


def test_two_prompt_modes_or_an_answer_longer_than_the_window_are_refused(tiny_run, tmp_path, monkeypatch):
    """--instruction with --chat or --input_file was ignored without a word; a --max_new_tokens past the context
    window blamed each prompt with a negative token count, after the model had loaded."""
    from infer import infer
    from sftkit import generate

    src = write_jsonl(tmp_path / "q.jsonl", [{"instruction": "안녕"}])
    with pytest.raises(UserError, match="--instruction and --chat are different ways to prompt"):
        infer(adapter=tiny_run, instruction="안녕", chat=True)
    with pytest.raises(UserError, match="--instruction and --input_file are different ways to prompt"):
        infer(adapter=tiny_run, instruction="안녕", input_file=src, output_file=str(tmp_path / "a.jsonl"))
    monkeypatch.setattr(generate, "load_model", lambda *a, **k: pytest.fail("loaded before the check"))
    window = json.loads((Path(tiny_run) / "run.json").read_text())["args"]["max_seq_length"]
    with pytest.raises(UserError, match=f"--max_new_tokens 100000000 fills the whole context window of {window} "
                                        "tokens, leaving no room for the prompt"):
        infer(adapter=tiny_run, instruction="안녕", max_new_tokens=100_000_000)


def test_a_checkpoint_of_a_killed_run_answers_with_the_runs_settings(tiny_run, tmp_path, capsys):
    """A run killed mid-training has no adapter in its folder, only checkpoints: infer.py now serves one of them
    with the run's record (template, base), and the run's own error points to it; a checkpoint cut off is named."""
    from infer import infer

    run = tmp_path / "killed"
    shutil.copytree(tiny_run, run)
    record = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**record, "status": "running"}))
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (run / name).unlink()
    ckpt = sorted(run.glob("checkpoint-*"))[-1]
    with pytest.raises(UserError, match=f"or try its newest checkpoint: infer.py --adapter {ckpt}"):
        infer(adapter=str(run), instruction="안녕")
    infer(adapter=str(ckpt), instruction="안녕", max_new_tokens=4)
    from_checkpoint = capsys.readouterr().out
    infer(adapter=tiny_run, instruction="안녕", max_new_tokens=4)  # the finished run: its last checkpoint's weights
    assert from_checkpoint.strip() and from_checkpoint == capsys.readouterr().out
    (ckpt / "adapter_model.safetensors").unlink()
    with pytest.raises(UserError, match="is a checkpoint of .* without adapter files.*another checkpoint-N"):
        infer(adapter=str(ckpt), instruction="안녕")


def test_chat_with_stdin_closed_says_so(tiny_run):
    done = script("infer.py", "--adapter", tiny_run, "--chat", stdin=subprocess.DEVNULL)
    assert done.returncode == 0  # EOF at once: a clean end, no traceback
    closed = subprocess.run(f"{sys.executable} {ROOT / 'infer.py'} --adapter {tiny_run} --chat <&-", shell=True,
                            capture_output=True, text=True, timeout=300)
    assert closed.returncode == 2 and "standard input, which is closed" in closed.stderr


def test_an_adapter_on_a_base_of_another_shape_is_one_line(tmp_path, tiny_run):
    from transformers import AutoConfig, LlamaForCausalLM

    from sftkit.generate import open_generator

    cfg = AutoConfig.from_pretrained(TINY)
    cfg.hidden_size, cfg.intermediate_size = cfg.hidden_size * 2, cfg.intermediate_size * 2
    other = tmp_path / "wider"
    LlamaForCausalLM(cfg).save_pretrained(other)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (other / name).write_bytes((Path(TINY) / name).read_bytes())
    with pytest.raises(UserError, match="trained on a base model of another shape.*Drop --model_name"):
        open_generator(tiny_run, model_name=str(other))


def test_batch_answers_record_their_settings_and_refuse_to_mix(tmp_path, tiny_run):
    from infer import infer

    src = write_jsonl(tmp_path / "q.jsonl", [{"instruction": "안녕하세요"}, {"instruction": "고마워요"}])
    dst = tmp_path / "a.jsonl"
    infer(adapter=tiny_run, input_file=src, output_file=str(dst), max_new_tokens=4)
    lines = [json.loads(x) for x in dst.read_text(encoding="utf-8").splitlines()]
    assert [x["settings"]["max_new_tokens"] for x in lines] == [4, 4]
    assert lines[0]["settings"]["template"] == "alpaca_ko" and lines[0]["settings"]["model"] == str(Path(tiny_run))
    before = dst.read_bytes()
    with pytest.raises(UserError, match="other settings \\(max_new_tokens: 4 there, 8 now\\)"):
        infer(adapter=tiny_run, input_file=src, output_file=str(dst), max_new_tokens=8)
    assert dst.read_bytes() == before
    infer(adapter=tiny_run, input_file=src, output_file=str(dst), max_new_tokens=4)  # same settings: nothing to do
    assert dst.read_bytes() == before


def test_a_prompt_past_the_window_is_refused_naming_it(tmp_path, tiny_run):
    from infer import infer

    long = "비밀번호 " * 400
    src = write_jsonl(tmp_path / "q.jsonl", [{"instruction": "짧은 질문"}, {"instruction": long}])
    dst = tmp_path / "a.jsonl"
    with pytest.raises(UserError, match="prompt 2 \\(\\d+ tokens\\): longer than the \\d+ tokens"):
        infer(adapter=tiny_run, input_file=src, output_file=str(dst), max_seq_length=256, max_new_tokens=8)
    assert not dst.exists() or dst.read_text() == ""  # refused before any answer was written


def test_a_flag_without_its_value_and_single_dash_flags_are_refused(tmp_path):
    done = script("train_unsloth.py", "--model_name", TINY, "--dataset", SAMPLE, "--output_dir", cwd=tmp_path)
    assert done.returncode == 2 and "--output_dir needs a value" in done.stderr and not any(tmp_path.iterdir())
    short = script("train_unsloth.py", "--model_name", TINY, "-r", "8", cwd=tmp_path)
    assert short.returncode == 2 and "write flags with two dashes, --r VALUE" in short.stderr


def test_raw_text_takes_no_template(tmp_path):
    from train_unsloth import train

    text = write_jsonl(tmp_path / "t.jsonl", [{"text": f"문장 {i}"} for i in range(8)])
    with pytest.raises(UserError, match="raw text.*take no template. Pass --prompt none"):
        train(model_name=TINY, dataset=text, prompt="alpaca", output_dir=str(tmp_path / "run"), max_steps=1)


def test_a_batch_with_a_template_file_resumes(tmp_path):
    """--prompt given as a path: a rerun of the same command finds its own answers (the settings name the
    template the same way before and after the model loads)."""
    from infer import infer

    src = write_jsonl(tmp_path / "q.jsonl", [{"instruction": "안녕"}, {"instruction": "고마워요"}])
    dst = tmp_path / "a.jsonl"
    template = str(ROOT / "prompts" / "alpaca.json")
    infer(model_name=TINY, prompt=template, input_file=src, output_file=str(dst), max_new_tokens=2)
    before = dst.read_bytes()
    infer(model_name=TINY, prompt=template, input_file=src, output_file=str(dst), max_new_tokens=2)
    assert dst.read_bytes() == before  # nothing to do: both rows answered with these settings


def test_seed_and_repetition_penalty_out_of_range_are_refused_before_anything_loads(tmp_path):
    """transformers refused them only after the model (and, in training, the data) had loaded, and training blamed
    the data or the template for a bad --seed."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    for script, args, said in (
            ("infer.py", ["--adapter", "nowhere", "--instruction", "hi", "--repetition_penalty", "0"],
             "--repetition_penalty must be above 0"),
            ("infer.py", ["--adapter", "nowhere", "--instruction", "hi", "--seed", "-1"],
             "--seed must be a whole number from 0 to 4294967295, got -1"),
            ("train_unsloth.py", ["--model_name", "nowhere/x/y", "--dataset", "none.jsonl", "--seed", "-1",
                                  "--output_dir", str(tmp_path / "run")],
             "--seed must be a whole number from 0 to 4294967295, got -1")):
        done = subprocess.run([sys.executable, str(root / script), *args], capture_output=True, text=True,
                              cwd=tmp_path, timeout=300)
        assert done.returncode != 0 and said in done.stderr and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert not (tmp_path / "run").exists()  # refused before the run folder was claimed
