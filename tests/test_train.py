import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import SAMPLE, TINY, metrics, quick_args, write_jsonl
from sftkit.errors import UserError
from train_unsloth import train


def test_loss_falls_and_lora_weights_change(tiny_run):
    losses = [m["loss"] for m in metrics(tiny_run)]
    assert len(losses) == 20
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3  # clearly down, not noise
    weights = load_file(str(Path(tiny_run) / "adapter_model.safetensors"))
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert len(lora_b) == 2 * 7  # 2 layers x q,k,v,o,gate,up,down
    assert all(v.abs().sum() > 0 for v in lora_b)  # LoRA B starts at zero: any non-zero value was learned


def test_run_json_explains_the_run(tiny_run):
    rec = json.loads((Path(tiny_run) / "run.json").read_text())
    assert rec["status"] == "finished"
    assert rec["args"]["r"] == 16 and rec["args"]["optim"] == "adamw_8bit" and rec["args"]["seed"] == 3407
    assert rec["backend"]["backend"] == "hf" and rec["backend"]["dtype"] == "fp32" and rec["backend"]["reason"]
    assert rec["template"] == "alpaca_ko" and "### 응답:" in rec["template_text"]
    assert rec["versions"]["transformers"] and rec["versions"]["trl"] and rec["versions"]["peft"]
    assert rec["metrics"]["global_step"] == 20 and rec["metrics"]["train_runtime"] > 0
    mem = rec["memory"]
    for key in ("train_seconds", "train_minutes", "peak_reserved_gb", "peak_reserved_for_training_gb",
                "peak_reserved_pct", "training_pct", "tokens_per_second"):
        assert mem[key] is not None, key
    assert mem["memory_kind"].startswith("process RSS")
    assert rec["model_path"] == TINY and rec["data"]["rows_used"] == 16


def test_adapter_reloads_and_changes_the_model(tiny_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_run)
    ids = tok("### 지시문:\n안녕\n\n### 응답:\n", return_tensors="pt")["input_ids"]
    base = AutoModelForCausalLM.from_pretrained(TINY)
    with torch.no_grad():
        base_logits = base(ids).logits
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(TINY), tiny_run).eval()
    again = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(TINY), tiny_run).eval()
    with torch.no_grad():
        a, b = tuned(ids).logits, again(ids).logits
    assert torch.equal(a, b)  # reloading is deterministic
    assert not torch.allclose(a, base_logits, atol=1e-4)  # and the adapter does something
    g1 = tuned.generate(ids, max_new_tokens=8, do_sample=False)
    g2 = again.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(g1, g2)


def test_finished_run_is_never_overwritten_unless_asked(tiny_run):
    before = (Path(tiny_run) / "adapter_model.safetensors").read_bytes()
    with pytest.raises(UserError, match="finished run.*--overwrite"):
        train(**quick_args(Path(tiny_run).parent, max_steps=2))
    assert (Path(tiny_run) / "adapter_model.safetensors").read_bytes() == before


def test_overwrite_replaces_and_resume_continues_from_the_checkpoint(tmp_path):
    out = train(**quick_args(tmp_path, max_steps=4, save_steps=2))
    assert json.loads((Path(out) / "run.json").read_text())["metrics"]["global_step"] == 4
    # Resume from checkpoint-4 and go on to step 8: the new metrics start at step 5, not 1.
    train(**quick_args(tmp_path, max_steps=8, save_steps=2, resume=True))
    steps = [m["step"] for m in metrics(out)]
    assert steps == list(range(1, 9))
    rec = json.loads((Path(out) / "run.json").read_text())
    assert rec["resumed_from"].endswith("checkpoint-4") and rec["metrics"]["global_step"] == 8
    out2 = train(**quick_args(tmp_path, max_steps=2, save_steps=0, overwrite=True))
    assert [m["step"] for m in metrics(out2)] == [1, 2]


def test_resume_without_checkpoint_and_bad_flags(tmp_path):
    with pytest.raises(UserError, match="no checkpoint"):
        train(**quick_args(tmp_path, resume=True))
    with pytest.raises(UserError, match="contradict"):
        train(**quick_args(tmp_path, resume=True, overwrite=True))
    with pytest.raises(UserError, match="report_to"):
        train(**quick_args(tmp_path, report_to="mlflow"))


def test_bad_inputs_fail_before_training(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        train(**quick_args(tmp_path, dataset="./nope.jsonl"))
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(UserError, match=r"columns.*question.*--columns"):
        train(**quick_args(tmp_path, dataset=qa, overwrite=True))
    empty = write_jsonl(tmp_path / "empty.jsonl", [{"instruction": "q", "input": "", "output": ""}])
    with pytest.raises(UserError, match="no usable rows"):
        train(**quick_args(tmp_path, dataset=empty, overwrite=True))
    with pytest.raises(UserError, match="without config.json"):
        train(**quick_args(tmp_path, model_name=str(tmp_path), overwrite=True))


def test_mapped_columns_train(tmp_path):
    rows = [{"question": f"질문 {i}", "answer": f"답 {i}"} for i in range(8)]
    qa = write_jsonl(tmp_path / "qa.jsonl", rows)
    out = train(**quick_args(tmp_path, dataset=qa, columns="instruction=question,output=answer", max_steps=2))
    assert json.loads((Path(out) / "run.json").read_text())["data"]["rows_used"] == 8


def test_fast_mode_regroups_micro_batches_without_changing_what_is_learned(tmp_path):
    slow = train(**quick_args(tmp_path / "a", max_steps=4, save_steps=0, max_samples=32))
    fast = train(**quick_args(tmp_path / "b", max_steps=4, save_steps=0, max_samples=32, fast=True))
    rec = json.loads((Path(fast) / "run.json").read_text())
    assert (rec["fast"]["per_device_train_batch_size"], rec["fast"]["gradient_accumulation_steps"]) == (8, 1)
    assert rec["fast"]["requested"] == [2, 4]  # args keep the request, so --resume re-plans from it
    assert (rec["args"]["per_device_train_batch_size"], rec["args"]["gradient_accumulation_steps"]) == (2, 4)
    a, b = metrics(slow), metrics(fast)
    assert [m["tokens_seen"] for m in a] == [m["tokens_seen"] for m in b]  # the same rows in each step
    for x, y in zip(a, b):  # and the same loss, step after step: the same updates were made
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4)


def test_fast_mode_run_resumes_with_the_same_command(tmp_path):
    args = quick_args(tmp_path, max_samples=32, fast=True, per_device_train_batch_size=1,
                      gradient_accumulation_steps=4, save_steps=2)
    train(**{**args, "max_steps": 2})
    out = train(**{**args, "max_steps": 4, "resume": True})
    rec = json.loads((Path(out) / "run.json").read_text())
    assert rec["status"] == "finished" and rec["metrics"]["global_step"] == 4
    assert rec["fast"]["requested"] == [1, 4] and rec["fast"]["per_device_train_batch_size"] == 4
    assert [m["step"] for m in metrics(out)] == [1, 2, 3, 4]  # continued at step 3, nothing repeated


def test_cli_target_modules_and_counts_as_fire_parses_them(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    out = tmp_path / "cli"
    done = subprocess.run([sys.executable, str(ROOT / "train_unsloth.py"), "--model_name", TINY, "--dataset", SAMPLE,
                           "--max_steps", "2", "--target_modules", "q_proj,v_proj", "--val_size", "20",
                           "--output_dir", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rec = json.loads((out / "run.json").read_text())
    assert rec["args"]["target_modules"] == ["q_proj", "v_proj"]
    keys = load_file(str(out / "adapter_model.safetensors")).keys()
    assert {k.split(".")[-3] for k in keys} == {"q_proj", "v_proj"}  # LoRA only where asked
    assert rec["data"]["rows_used"] == 231 and rec["metrics"]["eval_loss"] is not None  # 20 rows held out


def test_overwrite_deletes_nothing_until_everything_has_loaded(tmp_path, tiny_run):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_run, copy)
    with pytest.raises(UserError, match="does not exist"):
        train(**quick_args(tmp_path, dataset="./typo.jsonl", output_dir=str(copy), overwrite=True))
    assert (copy / "adapter_model.safetensors").is_file() and (copy / "run.json").is_file()
    other = tmp_path / "thesis"
    other.mkdir()
    (other / "notes.txt").write_text("not a run")
    with pytest.raises(UserError, match="not a run folder"):
        train(**quick_args(tmp_path, output_dir=str(other), overwrite=True))
    assert (other / "notes.txt").read_text() == "not a run"


def test_overwrite_keeps_the_old_run_when_the_trainer_refuses_the_template(tmp_path):
    """TRL checks a chat template's generation tags when the trainer is built: that must happen before
    --overwrite deletes anything, and the error must say what to do."""
    out = train(**quick_args(tmp_path, max_steps=2))
    chat = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}] * 8
    template = tmp_path / "plain.jinja"  # ChatML without {% generation %} tags
    template.write_text("{#- stop: <|im_end|> -#}\n{%- for m in messages -%}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
                        "'<|im_end|>\\n' }}{%- endfor -%}")
    with pytest.raises(UserError, match="generation.*--train_on_inputs"):
        train(**quick_args(tmp_path, dataset=write_jsonl(tmp_path / "c.jsonl", chat), prompt=str(template),
                           overwrite=True, max_steps=2))
    rec = json.loads((Path(out) / "run.json").read_text())
    assert rec["status"] == "finished" and (Path(out) / "adapter_model.safetensors").is_file()


def test_resume_takes_the_recorded_arguments_and_refuses_a_finished_run(tmp_path):
    out = train(**quick_args(tmp_path, max_steps=4, save_steps=2, learning_rate=5e-3, max_samples=24,
                             target_modules="q_proj,v_proj"))
    with pytest.raises(UserError, match="already finished at step 4"):
        train(output_dir=out, resume=True, max_steps=4)
    with pytest.raises(UserError, match="step 4; --max_steps 3 .*is not above the 4 steps it trained.*a larger"):
        train(output_dir=out, resume=True, max_steps=3)  # was: "resuming would train past it"
    with pytest.raises(UserError, match="already finished at step 4"):
        train(output_dir=out, resume=True)  # no --max_steps: the recorded 4, not the signature's 60
    with pytest.raises(UserError, match="--learning_rate 0.1 differs"):
        train(output_dir=out, resume=True, max_steps=6, learning_rate=0.1)
    # Everything else from run.json (tiny model, local data); the modules typed again as text are no conflict.
    train(output_dir=out, resume=True, max_steps=6, target_modules="q_proj,v_proj")
    rec = json.loads((Path(out) / "run.json").read_text())
    assert rec["args"]["model_name"] == TINY and rec["args"]["learning_rate"] == 5e-3
    assert rec["args"]["target_modules"] == ["q_proj", "v_proj"]
    assert rec["args"]["max_samples"] == 24 and rec["metrics"]["global_step"] == 6
    assert [m["step"] for m in metrics(out)] == [1, 2, 3, 4, 5, 6]


def test_out_of_memory_while_loading_says_what_to_change(tmp_path, monkeypatch):
    import sftkit.trainer

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(sftkit.trainer, "load_model", oom)
    with pytest.raises(UserError, match="out of GPU memory while loading.*--load_in_4bit"):
        train(**quick_args(tmp_path))
    assert not (tmp_path / "run" / "run.json").exists()  # nothing recorded as started


def test_resume_keeps_what_was_given_even_at_its_default(tmp_path):
    from sftkit import recorded

    (tmp_path / "run.json").write_text(json.dumps({"status": "interrupted", "args": {
        "max_steps": 200, "learning_rate": 5e-3, "target_modules": ["q_proj"], "dropped_long_ago": 1}}))
    known = {"max_steps", "learning_rate", "target_modules", "resume", "output_dir"}
    plain = recorded.resume_args(str(tmp_path), {"resume": True}, known)
    assert plain["max_steps"] == 200 and plain["learning_rate"] == 5e-3 and "dropped_long_ago" not in plain
    # 60 is train()'s default, but it was given: it counts (the step count may change on resume).
    assert recorded.resume_args(str(tmp_path), {"resume": True, "max_steps": 60}, known)["max_steps"] == 60
    # One module typed as text is the recorded one-element list, not a conflict.
    assert recorded.resume_args(str(tmp_path), {"resume": True, "target_modules": "q_proj"}, known)
    with pytest.raises(UserError, match="--learning_rate 0.0002 differs"):
        recorded.resume_args(str(tmp_path), {"resume": True, "learning_rate": 2e-4}, known)


def test_bad_data_is_caught_before_the_model_loads(tmp_path, monkeypatch):
    import sftkit.trainer

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the data were checked")

    monkeypatch.setattr(sftkit.trainer, "load_model", no_load)
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(UserError, match="--columns"):
        train(**quick_args(tmp_path, dataset=qa))
    empty = write_jsonl(tmp_path / "empty.jsonl", [{"instruction": "q", "input": "", "output": ""}])
    with pytest.raises(UserError, match="no usable rows"):
        train(**quick_args(tmp_path, dataset=empty))
    for bad in (dict(per_device_train_batch_size=0), dict(val_size=-3), dict(val_size=1.5)):
        with pytest.raises(UserError, match="must be a positive|--val_size"):
            train(**quick_args(tmp_path, **bad))


def test_out_of_memory_becomes_advice_and_a_failed_record(tmp_path, monkeypatch):
    import trl

    def oom(self, *a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(trl.SFTTrainer, "train", oom)
    with pytest.raises(UserError, match="out of GPU memory.*--per_device_train_batch_size.*memory_report.py"):
        train(**quick_args(tmp_path))
    rec = json.loads((tmp_path / "run" / "run.json").read_text())
    assert rec["status"] == "failed" and "out of memory" in rec["error"]


def test_unknown_lora_module_names_the_real_ones(tmp_path):
    with pytest.raises(UserError, match="qproj.*q_proj"):
        train(**quick_args(tmp_path, target_modules="qproj"))
    with pytest.raises(UserError, match="names no layer.*q_proj,v_proj"):
        train(**quick_args(tmp_path, target_modules=" , "))


def test_module_lists_read_one_way_everywhere():
    """Training, the memory estimate and the resume check split --target_modules alike: stray spaces and commas
    are dropped, so 'q_proj, v_proj,' trains, estimates and resumes as ['q_proj', 'v_proj']."""
    from sftkit import cli, estimate, recorded

    assert cli.names("q_proj, v_proj,") == ["q_proj", "v_proj"] == cli.names(("q_proj", " v_proj"))
    assert estimate.check_targets("q_proj, v_proj,") == ["q_proj", "v_proj"]
    assert recorded.same("q_proj, v_proj,", ["q_proj", "v_proj"]) and not recorded.same("q_proj", ["q_proj", "v_proj"])


def test_run_mean_loss_weights_each_logged_interval_by_its_steps():
    from sftkit.metricslog import run_mean_loss

    history = [{"loss": 4.0, "step": 2}, {"eval_loss": 9.0, "step": 2}, {"loss": 1.0, "step": 3},
               {"loss": 2.0, "step": 6}, {"train_loss": 0.5, "step": 6}]  # the summary line carries no "loss"
    assert run_mean_loss(history) == round((4.0 * 2 + 1.0 + 2.0 * 3) / 6, 4)
    assert run_mean_loss([]) is None

