"""The Unsloth path, on a CUDA GPU. Skipped elsewhere (see conftest.py). Run: python -m pytest -m gpu"""

import json
from pathlib import Path

import pytest

from conftest import SAMPLE, TINY, metrics, quick_args, write_jsonl

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def unsloth_run(tmp_path_factory):
    from train_unsloth import train

    tmp = tmp_path_factory.mktemp("gpu")
    return train(**quick_args(tmp, backend="unsloth", max_steps=20, max_samples=32, learning_rate=2e-2))


def test_unsloth_trains_the_tiny_model_in_4bit(unsloth_run):
    rec = json.loads((Path(unsloth_run) / "run.json").read_text())
    assert rec["backend"]["backend"] == "unsloth" and rec["backend"]["device"].startswith("cuda")
    assert rec["backend"]["dtype"] == "bf16" and rec["versions"]["unsloth"]
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


def test_chat_format_through_unsloth(tmp_path):
    from train_unsloth import train

    rows = [{"messages": [{"role": "user", "content": f"질문 {i}"}, {"role": "assistant", "content": f"답변 {i}"}]}
            for i in range(16)]
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    out = train(**quick_args(tmp_path, backend="unsloth", dataset=data, prompt="llama-3.1-chat", max_steps=5))
    rec = json.loads((Path(out) / "run.json").read_text())
    assert rec["data"]["format"] == "chat" and rec["status"] == "finished" and rec["backend"]["backend"] == "unsloth"
