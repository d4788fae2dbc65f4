"""The pipeline on the real Llama 3.1 tokenizer, in each layout users load (Meta's base with no pad token,
Unsloth's base with pad 128004, Instruct with eos <|eot_id|>): what the loss sees, which tokens pad and end
a row, what run.json records, and that a trained run answers in every inference mode."""

import json
from pathlib import Path

import pytest
import torch

from conftest import FLAVOURS, needs_fixture, real_tokenizer_model, write_jsonl
from sftkit import data, prompts
from sftkit.backend import choose, load_model

pytestmark = needs_fixture

ROWS = [{"instruction": f"질문 {i}: 비밀번호는 어떻게 만들까요?", "input": "", "output": f"길고 무작위인 문장 {i}"}
        for i in range(8)]
EOS = {"base-meta": "<|end_of_text|>", "base-unsloth": "<|end_of_text|>", "instruct-meta": "<|eot_id|>"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    return {f: real_tokenizer_model(f, root / f) for f in FLAVOURS}


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_the_loss_sees_the_answer_and_one_eos_after_one_bos(tmp_path, models, flavour):
    """The trainer's own tokenized row: exactly one BOS, the label mask covers the answer and exactly one EOS of
    this layout, and nothing of the prompt."""
    from datasets import Dataset

    from sftkit import trainer
    from test_trainer_steps import args

    model, tok, _ = load_model(models[flavour], 256, choose("hf", "fp32"), load_in_4bit=False)
    assert tok.eos_token == EOS[flavour] and tok.pad_token == "<|finetune_right_pad_id|>"  # never the EOS
    rows, info = data.read_rows(Dataset.from_list(ROWS), prompts.load("alpaca_ko"))
    train_rows, _ = data.finalize(rows, tok.eos_token, 0, 0)
    a = args(model_name=models[flavour], output_dir=str(tmp_path / "run"), max_seq_length=256, save_steps=0)
    config = trainer.sft_config(a, choose("hf", "fp32"), trainer.Plan(2, 1, False), False, 1, chat=False)
    sft = trainer.build_trainer(model, tok, train_rows, None, config, a["output_dir"], trainer_stopper(),
                                choose("hf", "fp32"))
    batch = sft.data_collator([sft.train_dataset[0]])  # what the model is given: ids and labels (-100: no loss)
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    answer = [t for t in labels if t != -100]
    assert tok.decode(answer) == ROWS[0]["output"] + EOS[flavour]
    assert answer.count(tok.eos_token_id) == 1 and answer[-1] == tok.eos_token_id
    start = labels.index(answer[0])
    assert all(t == -100 for t in labels[:start]) and labels[start:] == ids[start:]  # nothing of the prompt
    assert tok.decode(ids[:start], skip_special_tokens=True) == prompts.render(prompts.load("alpaca_ko"), ROWS[0])


def trainer_stopper():
    from sftkit.interrupt import interrupt_callback

    return interrupt_callback()


@pytest.mark.slow
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_train_record_and_answer_in_every_mode(tmp_path, models, flavour, capsys):
    from infer import infer
    from safetensors.torch import load_file
    from train_unsloth import train

    src = write_jsonl(tmp_path / "d.jsonl", ROWS)
    out = train(model_name=models[flavour], dataset=src, max_steps=4, learning_rate=1e-2, warmup_steps=0,
                per_device_train_batch_size=2, gradient_accumulation_steps=1, save_steps=0, max_seq_length=256,
                output_dir=str(tmp_path / "run"), save_merged="16bit" if flavour == "base-unsloth" else "")
    rec = json.loads((Path(out) / "run.json").read_text())
    assert rec["tokens"]["eos"] == {"token": EOS[flavour], "id": {"<|end_of_text|>": 128001, "<|eot_id|>": 128009}[
        EOS[flavour]]}
    assert rec["tokens"]["pad"] == {"token": "<|finetune_right_pad_id|>", "id": 128004}  # chosen where base has none
    assert rec["tokens"]["bos"]["id"] == 128000 and rec["status"] == "finished"
    infer(adapter=out, instruction="비밀번호는 어떻게 만들까요?", max_new_tokens=6)
    infer(adapter=out, instruction="비밀번호는 어떻게 만들까요?", max_new_tokens=6, compare_base=True)
    shown = capsys.readouterr().out
    assert "=== base model (adapter off) ===" in shown and "=== fine-tuned (adapter on) ===" in shown
    q = write_jsonl(tmp_path / "q.jsonl", [{"instruction": r["instruction"]} for r in ROWS[:3]])
    infer(adapter=out, input_file=q, output_file=str(tmp_path / "a.jsonl"), max_new_tokens=6, batch_size=2)
    answers = [json.loads(x) for x in (tmp_path / "a.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [a["_row"] for a in answers] == [0, 1, 2] and all(a["stopped"] in ("eos", "length") for a in answers)
    if flavour == "base-unsloth":  # --save_merged 16bit on a CPU writes 16-bit weights, in the base's dtype
        weights = load_file(str(Path(out) / "merged-16bit" / "model.safetensors"))
        assert {w.dtype for w in weights.values()} == {torch.bfloat16}
