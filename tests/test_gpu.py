"""The Unsloth path, on a CUDA GPU. Skipped elsewhere (see conftest.py). Run: python -m pytest -m gpu"""

import json
from pathlib import Path

import pytest

from conftest import DTYPE, SAMPLE, TINY, metrics, quick_args, write_jsonl

pytestmark = pytest.mark.gpu


def test_unsloth_trains_the_tiny_model_in_4bit(unsloth_run):
    rec = json.loads((Path(unsloth_run) / "run.json").read_text())
    assert rec["backend"]["backend"] == "unsloth" and rec["backend"]["device"].startswith("cuda")
    import torch

    native_bf16 = torch.cuda.get_device_capability()[0] >= 8  # a T4 (7.5) trains in fp16
    expected = DTYPE if DTYPE != "auto" else ("bf16" if native_bf16 else "fp16")
    assert rec["backend"]["dtype"] == expected and rec["versions"]["unsloth"]
    assert rec["memory"]["memory_kind"] == "gpu" and rec["memory"]["peak_reserved_gb"] > 0
    losses = [m["loss"] for m in metrics(unsloth_run)]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5  # learning happened
    from safetensors.torch import load_file

    w = load_file(str(Path(unsloth_run) / "adapter_model.safetensors"))
    assert all(v.abs().sum() > 0 for k, v in w.items() if "lora_B" in k)


def test_for_inference_streamed_and_batched_agree(unsloth_run, capsys):
    from sftkit.generate import open_generator

    g = open_generator(unsloth_run, max_new_tokens=24, do_sample=False)
    assert g.choice.backend == "unsloth"
    prompts = [{"instruction": "비밀번호를 안전하게 만드는 방법은?", "input": ""},
               {"instruction": "다음 문장을 존댓말로 바꿔 주세요.", "input": "밥 먹었어?"}]
    streamed = [g.answer(p["instruction"], p["input"], stream=True)["answer"] for p in prompts]
    printed = capsys.readouterr().out
    assert printed.strip() and "### 지시문" not in printed  # streamed answers, prompt not echoed
    batched = [a["answer"] for a in g.answer_batch(prompts)]
    print("streamed:", streamed, "batched:", batched)
    assert len(batched) == 2
    longest = max(range(2), key=lambda i: len(g.prompt_ids(prompts[i]["instruction"], prompts[i]["input"])))
    assert streamed[longest] == batched[longest]  # greedy, and the longest prompt gets no padding: must agree


def test_merged_adapter_on_unsloth_4bit(unsloth_run):
    """--merge_adapter on the Unsloth path: peft re-quantizes the 4-bit weights with the LoRA product added, so
    the merged model's next-token logits must sit much nearer the adapter's than the base model's."""
    import torch

    from sftkit.generate import open_generator

    g = open_generator(unsloth_run, max_new_tokens=16, do_sample=False)
    merged = open_generator(unsloth_run, max_new_tokens=16, do_sample=False, merge_adapter=True)
    assert not any("lora" in name for name, _ in merged.model.named_modules())
    ids = torch.tensor([g.prompt_ids("비밀번호를 안전하게 만드는 방법은?")], device=g.device)
    with torch.inference_mode():
        tuned = g.model(input_ids=ids).logits[0, -1].float()
        with g.model.disable_adapter():
            base = g.model(input_ids=ids).logits[0, -1].float()
        folded = merged.model(input_ids=ids).logits[0, -1].float()
    print("merged-adapter", (folded - tuned).norm().item(), "base-adapter", (base - tuned).norm().item())
    assert (folded - tuned).norm() < 0.5 * (base - tuned).norm()
    assert merged.answer("비밀번호를 안전하게 만드는 방법은?")["tokens"] > 0


def test_chat_format_through_unsloth(tmp_path):
    from train_unsloth import train

    rows = [{"messages": [{"role": "user", "content": f"질문 {i}"}, {"role": "assistant", "content": f"답변 {i}"}]}
            for i in range(16)]
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    out = train(**quick_args(tmp_path, backend="unsloth", dataset=data, prompt="llama-3.1-chat", max_steps=5))
    rec = json.loads((Path(out) / "run.json").read_text())
    assert rec["data"]["format"] == "chat" and rec["status"] == "finished" and rec["backend"]["backend"] == "unsloth"


COMPARE_IN_PLAIN_TRANSFORMERS = """
import sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
merged_dir, adapter_dir, base_dir = sys.argv[1:4]
tok = AutoTokenizer.from_pretrained(merged_dir)
ids = tok("### 지시문:\\n안녕하세요\\n\\n### 응답:\\n", return_tensors="pt")["input_ids"].cuda()
merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.bfloat16).cuda().eval()
adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16).cuda(),
                                    adapter_dir).eval()
a = merged.generate(ids, max_new_tokens=12, do_sample=False)[0].tolist()
b = adapted.generate(ids, max_new_tokens=12, do_sample=False)[0].tolist()
print("PROMPT", ids.shape[1])
print("MERGED", a)
print("ADAPTED", b)
"""


def test_unsloth_merged_16bit_matches_base_plus_adapter(tmp_path):
    """Unsloth's merged save loads with plain transformers and gives the adapter's greedy tokens.

    The check runs in a fresh process that never imports unsloth, as a user's serving code would: in this
    process Unsloth has patched transformers' Llama classes, so any model loaded here takes Unsloth's path.
    """
    import subprocess
    import sys

    from train_unsloth import train

    out = train(**quick_args(tmp_path, backend="unsloth", max_steps=10, save_merged="16bit", save_steps=0))
    res = subprocess.run([sys.executable, "-c", COMPARE_IN_PLAIN_TRANSFORMERS, str(Path(out) / "merged-16bit"),
                          str(out), str(TINY)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in res.stdout.splitlines()
                 if line.startswith(("PROMPT", "MERGED", "ADAPTED")))
    assert lines["MERGED"] == lines["ADAPTED"]
    assert len(json.loads(lines["MERGED"])) > int(lines["PROMPT"])  # new tokens were generated


HF_MERGE_ON_CPU = """
import logging, sys
import sftkit.backend.merging
logging.basicConfig(level=logging.INFO)  # as run_cli does for the scripts: the merge logs where it runs
# As when a 16-bit base does not fit beside the training model (an 8B base on a T4): merge_device picks the CPU.
sftkit.backend.merging.merge_device = lambda mode, need, free: ("CPU", "as if the base did not fit the GPU")
from train_unsloth import train
train(model_name=sys.argv[1], dataset=sys.argv[2], output_dir=sys.argv[3], backend="hf", max_samples=16,
      max_steps=10, learning_rate=1e-2, warmup_steps=0, save_steps=0, save_merged="16bit", dtype=sys.argv[4])
"""


def test_hf_backend_merges_on_the_cpu_when_the_gpu_is_short(tmp_path):
    """The plain path's 16-bit merge loads a fresh base; where it would not fit the GPU it is loaded and merged on
    the CPU instead. The merged model must still give the adapter's greedy tokens (fresh processes: no Unsloth)."""
    import subprocess
    import sys

    out = tmp_path / "run"
    res = subprocess.run([sys.executable, "-c", HF_MERGE_ON_CPU, TINY, SAMPLE, str(out), DTYPE], capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "merging on the CPU: as if the base did not fit the GPU" in res.stderr
    cmp = subprocess.run([sys.executable, "-c", COMPARE_IN_PLAIN_TRANSFORMERS, str(out / "merged-16bit"), str(out),
                          str(TINY)], capture_output=True, text=True, timeout=300)
    assert cmp.returncode == 0, cmp.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in cmp.stdout.splitlines() if line.startswith(("MERGED", "ADAPTED")))
    print(lines)
    assert lines["MERGED"] == lines["ADAPTED"]


def test_gguf_through_unsloth_uses_llama_cpp_offline(tmp_path):
    """--save_gguf on the Unsloth path: Unsloth's 16-bit merge, then llama.cpp's converter (no GitHub clone)."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed on this GPU machine")
    from train_unsloth import train

    out = train(**quick_args(tmp_path, backend="unsloth", max_steps=3, save_gguf="q8_0", save_steps=0))
    rec = json.loads((Path(out) / "run.json").read_text())
    assert [Path(f).name for f in rec["exports"]["gguf"]["files"]] == ["model-q8_0.gguf"]
    assert (Path(out) / "gguf" / "Modelfile").is_file() and rec["status"] == "finished"


def test_cudnn_attention_is_off_unless_asked():
    import torch

    from sftkit.backend import attention_kernels

    assert "off" in attention_kernels(False) and not torch.backends.cuda.cudnn_sdp_enabled()
    assert "allowed" in attention_kernels(True) and torch.backends.cuda.cudnn_sdp_enabled()
    attention_kernels(False)


def test_fast_mode_plans_on_the_gpu_and_resume_continues(tmp_path):
    """`--fast` as a user types it, on the GPU: the plan keeps the effective batch, and a plain `--resume`
    with a larger --max_steps continues from the last checkpoint with the recorded arguments."""
    import subprocess

    from conftest import train_cmd

    out = tmp_path / "run"
    first = subprocess.run(train_cmd("--model_name", TINY, "--dataset", SAMPLE, "--max_samples", "64", "--fast",
                                     "--max_steps", "4", "--save_steps", "2", "--learning_rate", "1e-2",
                                     "--output_dir", str(out)), capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    rec = json.loads((out / "run.json").read_text())
    plan = rec["fast"]
    assert rec["backend"]["backend"] == "unsloth" and rec["status"] == "finished"
    assert plan["per_device_train_batch_size"] * plan["gradient_accumulation_steps"] == 2 * 4  # effective batch kept
    assert plan["per_device_train_batch_size"] == 8 and plan["gradient_accumulation_steps"] == 1  # tiny model fits
    assert rec["args"]["per_device_train_batch_size"] == 2  # the request is recorded, the plan beside it
    assert "fast mode: micro-batch 8 x accumulation 1" in first.stderr
    again = subprocess.run(train_cmd("--output_dir", str(out), "--resume", "--max_steps", "6"),
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    rec = json.loads((out / "run.json").read_text())
    keys = ("per_device_train_batch_size", "gradient_accumulation_steps", "gradient_checkpointing")
    assert rec["status"] == "finished" and rec["metrics"]["global_step"] == 6
    assert [rec["fast"][k] for k in keys] == [plan[k] for k in keys]  # re-planned alike (reason names free memory)
    assert rec["resumed_from"].endswith("checkpoint-4")
    assert [m["step"] for m in metrics(out)] == list(range(1, 7))


@pytest.mark.parametrize("backend", ["unsloth", "hf"])
def test_fp16_as_on_a_t4_trains_and_answers(tmp_path, backend):
    """What a T4 (no native bf16) runs: --dtype fp16, float16 weights around the 4-bit base and loss scaling, on
    Unsloth and on the plain path a T4 takes when Unsloth fails to import (it used to crash at the first optimizer
    step: the gradient scaler unscales only fp32 gradients). The loss must stay finite and fall, the adapter must
    hold finite, trained weights, and infer.py in fp16 must answer from it."""
    import math
    import re
    import subprocess
    import sys

    import torch
    from safetensors.torch import load_file

    from conftest import ROOT, train_cmd

    out = tmp_path / "run"
    res = subprocess.run(train_cmd("--model_name", TINY, "--dataset", SAMPLE, "--max_samples", "32", "--dtype", "fp16",
                                   "--max_steps", "20", "--learning_rate", "2e-2", "--warmup_steps", "0",
                                   "--save_steps", "0", "--output_dir", str(out), "--backend", backend),
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rec = json.loads((out / "run.json").read_text())
    assert rec["backend"]["backend"] == backend and rec["backend"]["dtype"] == "fp16"
    losses = [m["loss"] for m in metrics(out)]
    print("fp16 losses:", [round(x, 3) for x in losses])
    assert len(losses) == 20 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5  # learning happened under loss scaling
    w = load_file(str(out / "adapter_model.safetensors"))
    assert all(torch.isfinite(v).all() for v in w.values())
    assert all(v.abs().sum() > 0 for k, v in w.items() if "lora_B" in k)  # B starts at zero: it was trained
    ans = subprocess.run([sys.executable, str(ROOT / "infer.py"), "--adapter", str(out), "--dtype", "fp16",
                          "--backend", backend,
                          "--instruction", "비밀번호를 안전하게 만드는 방법은?", "--max_new_tokens", "12"],
                         capture_output=True, text=True, timeout=600)
    assert ans.returncode == 0, ans.stderr[-3000:]
    answer = ans.stdout.strip().splitlines()[-1]  # Unsloth prints its banner to stdout first; the answer comes last
    print("fp16 answer:", answer)
    assert re.search("[가-힣]", answer), ans.stdout[-1000:]  # a Korean answer, as trained: not the banner, not NaN junk
    assert "dtype=fp16" in ans.stderr  # decoded in the dtype asked for


REAL_ROWS = {
    "alpaca": [{"instruction": f"질문 {i}: 비밀번호는 어떻게 만들까요?", "input": "", "output": f"길고 무작위인 문장 {i}"}
               for i in range(16)],
    "chat": [{"messages": [{"role": "user", "content": f"질문 {i}"}, {"role": "assistant", "content": f"답변 {i}"}]}
             for i in range(16)],
}


@pytest.mark.parametrize("flavour, backend, kind, template", [
    ("base-unsloth", "unsloth", "alpaca", "alpaca_ko"),  # the default: Unsloth's base id, Korean Alpaca
    ("base-meta", "unsloth", "chat", "llama-3.1-chat"),  # chat data on a base model: the built-in template
    ("instruct-meta", "unsloth", "chat", "own"),  # chat data on an Instruct model: its own template
    ("instruct-meta", "hf", "alpaca", "alpaca_ko"),  # the plain path a T4 takes when Unsloth fails to import
])
def test_real_tokenizer_model_trains_and_answers(tmp_path, flavour, backend, kind, template):
    """A tiny model on the real Llama 3.1 tokenizer, in the layouts users load, trained with --prompt auto and
    answered by infer.py's generator: the recorded template, EOS and pad, a finite loss, an answer that ends."""
    import math

    from conftest import FIXTURE, real_tokenizer_model
    from sftkit.generate import open_generator
    from train_unsloth import train

    if FIXTURE is None:
        pytest.skip("the real Llama 3.1 tokenizer fixture is absent (kept out of the repo)")
    model = real_tokenizer_model(flavour, tmp_path / "model")
    data = write_jsonl(tmp_path / "d.jsonl", REAL_ROWS[kind])
    args = quick_args(tmp_path, model_name=model, dataset=data, backend=backend, max_steps=6, max_seq_length=256,
                      save_steps=0)
    if backend == "hf":  # in a process of its own: Unsloth, imported by other tests here, patches transformers' Llama
        import subprocess
        import sys

        script = ("import json, sys; from train_unsloth import train; from sftkit.generate import open_generator; "
                  "out = train(**json.loads(sys.argv[1])); g = open_generator(out, max_new_tokens=8); "
                  "print(json.dumps([out, g.answer('비밀번호는 어떻게 만들까요?'), sorted(g.stop_ids)]))")
        done = subprocess.run([sys.executable, "-c", script, json.dumps(args)], capture_output=True, text=True,
                              timeout=600, cwd=Path(__file__).resolve().parent.parent)
        assert done.returncode == 0, done.stderr[-3000:]
        out, answer, stops = json.loads(done.stdout.strip().splitlines()[-1])
    else:
        out = train(**args)
        g = open_generator(out, max_new_tokens=8)
        answer, stops = g.answer("비밀번호는 어떻게 만들까요?"), g.stop_ids
    rec = json.loads((Path(out) / "run.json").read_text())
    assert rec["backend"]["backend"] == backend and rec["status"] == "finished"
    assert rec["template"] == template, rec["data"].get("template_reason")
    eos = "<|eot_id|>" if flavour == "instruct-meta" else "<|end_of_text|>"
    assert rec["tokens"]["eos"]["token"] == eos and rec["tokens"]["pad"]["id"] == 128004
    assert all(math.isfinite(m["loss"]) for m in metrics(out))
    print(flavour, backend, kind, answer)
    assert answer["stopped"] in ("eos", "length") and answer["tokens"] <= 8
    if flavour == "instruct-meta":
        assert {128001, 128008, 128009} <= set(stops)  # every stop id of the generation config
