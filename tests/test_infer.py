import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, SAMPLE, TINY, quick_args, write_jsonl
from sftkit.errors import UserError
from sftkit.batchfile import run_batch
from sftkit.generate import open_generator
from train_unsloth import train

ROWS = [json.loads(line) for line in Path(SAMPLE).read_text(encoding="utf-8").splitlines()][150:154]


@pytest.fixture(scope="module")
def memorized(tmp_path_factory):
    """A run trained hard on four rows, so the adapter's answers visibly differ from the base model's."""
    tmp = tmp_path_factory.mktemp("mem")
    data = write_jsonl(tmp / "four.jsonl", ROWS)
    return train(**quick_args(tmp, dataset=data, max_steps=60, learning_rate=2e-2, gradient_accumulation_steps=1,
                              save_steps=0, max_samples=0))


@pytest.fixture(scope="module")
def gen(memorized):
    return open_generator(memorized, max_new_tokens=48, do_sample=False)


def test_greedy_is_identical_single_streamed_and_batched(gen, capsys):
    prompts = [{"instruction": r["instruction"], "input": r["input"]} for r in ROWS[:3]]
    single = [gen.answer(p["instruction"], p["input"])["answer"] for p in prompts]
    streamed = [gen.answer(p["instruction"], p["input"], stream=True)["answer"] for p in prompts]
    printed = capsys.readouterr().out
    batched = [a["answer"] for a in gen.answer_batch(prompts)]  # left-padded to a common length
    assert single == streamed == batched
    assert all(s in printed for s in single)  # the streamer printed the answers ...
    assert "### 지시문" not in printed  # ... and not the prompt


def test_adapter_answer_differs_from_base_and_stops_at_eos(gen):
    tuned = gen.answer(ROWS[0]["instruction"])
    base = gen.answer(ROWS[0]["instruction"], base=True)
    assert tuned["stopped"] == "eos" and tuned["tokens"] < 48
    assert tuned["answer"] != base["answer"]
    assert tuned["answer"][:10] == ROWS[0]["output"][:10]  # it learned the start of the memorized answer


def test_batch_resumes_without_duplicates(gen, tmp_path):
    rows = [{"instruction": r["instruction"], "index": 100} for r in ROWS] + [{"instruction": "x"}]  # user "index"
    src = write_jsonl(tmp_path / "q.jsonl", rows)
    dst = tmp_path / "a.jsonl"
    # Pretend an earlier run answered two rows and was killed while writing the third.
    full = tmp_path / "full.jsonl"
    assert run_batch(gen, src, str(full), batch_size=2) == 5
    lines = full.read_text(encoding="utf-8").splitlines()
    dst.write_text("\n".join(lines[:2]) + "\n" + lines[2][:15], encoding="utf-8")
    assert run_batch(gen, src, str(dst), batch_size=2) == 3
    got = [json.loads(line) for line in dst.read_text(encoding="utf-8").splitlines() if line.endswith("}")]
    assert sorted(r["_row"] for r in got) == [0, 1, 2, 3, 4] and got[0]["index"] == 100  # user column kept
    assert {r["_row"]: r["answer"] for r in got} == {json.loads(x)["_row"]: json.loads(x)["answer"] for x in lines}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a"}\n{oops\n', encoding="utf-8")
    with pytest.raises(UserError, match="line 2 is not valid JSON"):
        run_batch(gen, str(bad), str(tmp_path / "o.jsonl"))


def test_compiled_batches_keep_one_size_and_drop_the_padding(gen, tmp_path, monkeypatch):
    """With --cuda_graphs a new batch size compiles the decode step again, so the last, smaller batch is padded
    to the others' size with copies of its last row, whose answers are not written."""
    sizes, real = [], gen.answer_batch

    def spy(rows, base=False):
        sizes.append(len(rows))
        return real(rows, base)

    monkeypatch.setattr(gen, "answer_batch", spy)
    src = write_jsonl(tmp_path / "q.jsonl", ROWS + [{"instruction": "x"}])
    assert not gen.compiled  # no compile_config in its generate arguments: batches are as they come
    assert run_batch(gen, src, str(tmp_path / "eager.jsonl"), batch_size=2) == 5 and sizes == [2, 2, 1]
    sizes.clear()
    monkeypatch.setattr(gen, "compiled", True)
    monkeypatch.setattr(gen, "gen", dict(gen.gen))  # run_batch sizes the cache there; restored after the test
    assert run_batch(gen, src, str(tmp_path / "a.jsonl"), batch_size=2) == 5
    got = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text(encoding="utf-8").splitlines()]
    assert sizes == [2, 2, 2] and [r["_row"] for r in got] == [0, 1, 2, 3, 4]
    assert got[4]["instruction"] == "x" and got[4]["answer"] == gen.answer("x")["answer"]
    longest = max(len(gen.prompt_ids(r["instruction"])) for r in ROWS) + 48  # prompt + max_new_tokens
    assert gen.gen["max_cache_len"] % 256 == 0 and longest <= gen.gen["max_cache_len"] < longest + 256


def test_compare_base_prints_both(memorized, gen):
    out = subprocess.run([sys.executable, str(ROOT / "infer.py"), "--adapter", memorized, "--instruction",
                          ROWS[0]["instruction"], "--compare_base", "--max_new_tokens", "48"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    nothing, base_part = out.stdout.split("=== base model (adapter off) ===\n", 1)
    base_part, tuned_part = base_part.split("=== fine-tuned (adapter on) ===\n", 1)
    assert "backend=hf" in out.stderr and not nothing.strip()
    # "Adapter off" must really be the bare base model: the same greedy answer as the base loaded without the
    # adapter at all, and not the memorized answer the adapter gives.
    bare = open_generator(model_name=TINY, prompt="alpaca_ko", max_new_tokens=48).answer(ROWS[0]["instruction"])
    tuned = gen.answer(ROWS[0]["instruction"])["answer"]
    assert bare["answer"] != tuned
    assert base_part.strip() == bare["answer"] and tuned_part.strip() == tuned


def test_chat_mode_reads_lines_until_eof(memorized, gen):
    out = subprocess.run([sys.executable, str(ROOT / "infer.py"), "--adapter", memorized, "--chat",
                          "--max_new_tokens", "48"], input=ROWS[0]["instruction"] + "\n\n" + ROWS[1]["instruction"] + "\n",
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stderr.count(">>> ") == 4  # two prompts, one blank line skipped, then EOF at the last prompt
    # One streamed answer per turn, in order (an instruction template: each line is answered on its own).
    expected = [gen.answer(r["instruction"])["answer"] for r in ROWS[:2]]
    assert all(expected) and out.stdout.split() == " ".join(expected).split()


def test_clear_errors(tmp_path, gen):
    with pytest.raises(UserError, match="does not exist"):
        open_generator(str(tmp_path / "nope"))
    with pytest.raises(UserError, match="no run.json.*--model_name"):
        open_generator(str(tmp_path))
    with pytest.raises(UserError, match="nothing to load"):
        open_generator()
    with pytest.raises(UserError, match="not found"):
        open_generator(model_name=TINY, prompt="nope")
    with pytest.raises(UserError, match="empty prompt"):
        gen.answer("   ")


def test_cli_text_arguments_stay_text(memorized):
    """Fire would read "hi, there" as a tuple; the CLI passes typed-str arguments through as typed."""
    out = subprocess.run([sys.executable, str(ROOT / "infer.py"), "--model_name", TINY, "--prompt", "llama-3.1-chat",
                          "--instruction", "hi, there", "--max_new_tokens", "3"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]


def test_merged_adapter_answers_like_the_adapter(memorized, gen, tmp_path):
    """--merge_adapter folds LoRA into the weights: no LoRA layer is left, and (in full precision, as on a CPU)
    the greedy answers are the adapter's own, not the base model's."""
    merged = open_generator(memorized, max_new_tokens=48, do_sample=False, merge_adapter=True)
    assert not any("lora" in name for name, _ in merged.model.named_modules())
    for r in ROWS[:3]:
        assert merged.answer(r["instruction"])["answer"] == gen.answer(r["instruction"])["answer"]
    assert merged.answer(ROWS[0]["instruction"])["answer"] != gen.answer(ROWS[0]["instruction"], base=True)["answer"]
    with pytest.raises(UserError, match="drop --merge_adapter"):
        merged.answer(ROWS[0]["instruction"], base=True)
    src, dst = write_jsonl(tmp_path / "q.jsonl", ROWS[:2]), tmp_path / "a.jsonl"
    assert run_batch(merged, src, str(dst)) == 2
    written = [json.loads(line) for line in dst.read_text(encoding="utf-8").splitlines()]
    assert [r["settings"]["merged_adapter"] for r in written] == [True, True]  # rows say they came from merged weights


def test_merge_adapter_without_adapter_fails_before_loading(no_model_load):
    with pytest.raises(UserError, match="no adapter to merge"):
        open_generator(model_name=TINY, merge_adapter=True)


def test_merged_4bit_weights_dequantize_to_the_compute_dtype():
    """peft re-quantizes merged 4-bit weights with a float32 state; merge_adapter restores the 16-bit one, or
    the weights would dequantize to float32 and meet bf16 activations (Unsloth's decode path fails on that)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from sftkit.backend import merge_adapter

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(TINY, quantization_config=q, dtype=torch.bfloat16)  # CPU bnb
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    merged = merge_adapter(lora)
    states = [m.weight.quant_state for m in merged.modules() if getattr(getattr(m, "weight", None), "quant_state", None)]
    assert len(states) == 14 and {s.dtype for s in states} == {torch.bfloat16}  # 2 layers x 7 projections


def test_template_with_a_further_field_is_answered_from_a_batch_file(tmp_path, no_model_load):
    """Training accepts any {field} that names a column; inference must fill it too (from a batch file's keys),
    and say before loading when it cannot (one-prompt mode, or a line without the key)."""
    import sftkit.generate
    from infer import infer

    template = tmp_path / "ctx.json"
    template.write_text(json.dumps({"prompt_input": "{context}\n질문: {instruction}\n{input}\n답: ",
                                    "prompt_no_input": "{context}\n질문: {instruction}\n답: ", "response_split": "답:"}))
    rows = [{**r, "context": f"배경 {i}"} for i, r in enumerate(ROWS)]
    run_dir = train(**quick_args(tmp_path, dataset=write_jsonl(tmp_path / "d.jsonl", rows), prompt=str(template),
                                 max_steps=2, save_steps=0, max_samples=0))
    with pytest.raises(UserError, match=r"also uses \['context'\].*--input_file"):
        infer(adapter=run_dir, instruction="hi")
    src = write_jsonl(tmp_path / "q.jsonl", [{"instruction": "a", "context": "c"}, {"instruction": "b"}])
    with pytest.raises(UserError, match=r"prompt 2 of --input_file lacks \['context'\]"):
        infer(adapter=run_dir, input_file=src, output_file=str(tmp_path / "a.jsonl"))
    from sftkit.backend import load_model

    with pytest.MonkeyPatch.context() as mp:  # the refusals above came before any load; now load and answer
        mp.setattr(sftkit.generate, "load_model", load_model)
        g = open_generator(run_dir, max_new_tokens=4, rows=rows)
        q = ROWS[0]["instruction"]
        assert g.prompt_ids(q, row={"context": "가"}) != g.prompt_ids(q, row={"context": "나"})  # the field is used
        src = write_jsonl(tmp_path / "q2.jsonl", [{"instruction": q, "context": "가"}, {"instruction": q, "context": "나"}])
        assert run_batch(g, src, str(tmp_path / "a2.jsonl"), batch_size=2) == 2
    got = [json.loads(x) for x in (tmp_path / "a2.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["context"] for r in got] == ["가", "나"] and all("answer" in r for r in got)


def test_a_long_chat_drops_its_oldest_exchanges_instead_of_ending(tmp_path):
    """A chat whose history outgrows the context window ended the whole session ("prompt 1 ... Shorten them") and
    left the remaining lines unanswered; now the oldest exchanges are left out and every line is answered."""
    lines = [f"질문 {n}: 비밀번호를 안전하게 만드는 방법을 알려 주세요." for n in range(12)]
    out = subprocess.run([sys.executable, str(ROOT / "infer.py"), "--model_name", TINY, "--prompt",
                          "llama-3.1-chat", "--chat", "--max_seq_length", "128", "--max_new_tokens", "20"],
                         input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stderr.count(">>> ") == len(lines) + 1  # every line answered, then EOF at the last prompt
    assert "oldest exchange(s) are left out from now on" in out.stderr and "Shorten them" not in out.stderr
