"""Data formats and the loss mask: which tokens the model is trained on."""

import json
import logging
from pathlib import Path

import pytest
from datasets import Dataset
from transformers import AutoTokenizer
from trl import SFTConfig, SFTTrainer

from conftest import TINY, metrics, prepared, quick_args, write_jsonl
from sftkit import data, prompts
from sftkit.errors import UserError
from train_unsloth import train

CHAT = [{"role": "user", "content": "김치찌개 끓이는 법?"}, {"role": "assistant", "content": "김치를 볶으세요."},
        {"role": "user", "content": "더 짧게"}, {"role": "assistant", "content": "볶고 끓여요."}]


def labels_for(rows, tok, **cfg):
    """Runs TRL's own preparation and collator, exactly as training does, and returns the first row's labels."""
    from transformers import AutoModelForCausalLM

    args = SFTConfig(output_dir="/tmp/unused", report_to="none", bf16=False, gradient_checkpointing=False,
                     max_length=512, **cfg)
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(TINY), processing_class=tok,
                         train_dataset=rows, args=args)
    batch = trainer.data_collator([trainer.train_dataset[0]])
    return batch["input_ids"][0].tolist(), batch["labels"][0].tolist()


def test_answer_only_labels_token_by_token():
    tok = AutoTokenizer.from_pretrained(TINY)
    ds = Dataset.from_list([{"instruction": "비밀번호 {만들기}", "input": "", "output": "길게 만드세요."}])
    rows, _ = prepared(ds, prompts.load("alpaca_ko"), tok.eos_token)
    ids, labels = labels_for(rows, tok, completion_only_loss=True)
    prompt_ids = tok(rows[0]["prompt"])["input_ids"]
    answer_ids = tok(rows[0]["prompt"] + rows[0]["completion"])["input_ids"][len(prompt_ids):]
    assert ids == prompt_ids + answer_ids
    assert labels[:len(prompt_ids)] == [-100] * len(prompt_ids)  # no loss on the prompt
    assert labels[len(prompt_ids):] == answer_ids  # loss on every answer token ...
    assert answer_ids[-1] == tok.eos_token_id  # ... including the EOS that teaches it to stop


def test_train_on_inputs_puts_loss_on_every_token():
    tok = AutoTokenizer.from_pretrained(TINY)
    ds = Dataset.from_list([{"instruction": "안녕", "input": "", "output": "반가워요."}])
    rows, _ = prepared(ds, prompts.load("alpaca_ko"), tok.eos_token, train_on_inputs=True)
    # The layout stays prompt/completion (so the length policy sees where the answer starts); without
    # completion_only_loss TRL trains on all of it, EOS included.
    assert rows.column_names == ["prompt", "completion"] and rows[0]["completion"].endswith(tok.eos_token)
    ids, labels = labels_for(rows, tok, completion_only_loss=False)
    assert labels == ids and ids[-1] == tok.eos_token_id
    assert ids == tok(rows[0]["prompt"] + rows[0]["completion"])["input_ids"]


def test_chat_loss_covers_only_assistant_turns():
    tok = AutoTokenizer.from_pretrained(TINY)
    template = prompts.load("llama-3.1-chat")
    tok.chat_template = template.text
    rows, info = prepared(Dataset.from_list([{"messages": CHAT}]), template, tok.eos_token)
    assert info["format"] == "chat"
    ids, labels = labels_for(rows, tok, assistant_only_loss=True)
    trained = tok.decode([i for i, l in zip(ids, labels) if l != -100])
    assert trained == "김치를 볶으세요.<|eot_id|>볶고 끓여요.<|eot_id|>"
    assert "김치찌개" in tok.decode(ids) and "김치찌개" not in trained


def test_sharegpt_is_normalised_and_text_gets_eos():
    template = prompts.load("chatml")
    share = Dataset.from_list([{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}])
    rows, info = prepared(share, template, "</s>")
    assert info["format"] == "chat" and rows[0]["messages"] == [{"role": "user", "content": "hi"},
                                                                {"role": "assistant", "content": "yo"}]
    text, info = prepared(Dataset.from_list([{"text": "plain"}, {"text": ""}]), prompts.load("none"), "</s>")
    assert info["format"] == "text" and text["text"] == ["plain</s>"] and info["rows_dropped"] == 1
    with pytest.raises(UserError, match="instruction template"):
        prepared(share, prompts.load("alpaca_ko"), "</s>")


def test_chat_training_and_multi_turn_inference(tmp_path):
    from sftkit.generate import open_generator

    rows = [{"messages": CHAT[:2]}, {"messages": CHAT}] * 4
    out = train(**quick_args(tmp_path, dataset=write_jsonl(tmp_path / "c.jsonl", rows), prompt="llama-3.1-chat",
                             max_steps=30, learning_rate=2e-2, gradient_accumulation_steps=1, save_steps=0,
                             max_samples=0))
    rec = json.loads((Path(out) / "run.json").read_text())
    assert rec["data"]["format"] == "chat" and rec["template_kind"] == "chat"
    g = open_generator(out, max_new_tokens=24)
    first = g.answer("김치찌개 끓이는 법?")
    assert first["answer"] == "김치를 볶으세요." and first["stopped"] == "eos"  # stops at <|eot_id|>
    history = CHAT[:1] + [{"role": "assistant", "content": first["answer"]}]
    with_history = g.tok.decode(g.prompt_ids("더 짧게", history=history))
    assert with_history.count("<|start_header_id|>user") == 2 and with_history.endswith("assistant<|end_header_id|>\n\n")
    # The earlier turns are in the prompt (the 385k-parameter model is too small to be judged on using them).
    assert g.answer("더 짧게", history=history)["stopped"] == "eos"


def test_val_size_logs_eval_loss_and_packing_trains(tmp_path):
    out = train(**quick_args(tmp_path, max_samples=40, val_size=0.25, max_steps=10, save_steps=5))
    rec = json.loads((Path(out) / "run.json").read_text())
    assert rec["metrics"]["eval_loss"] is not None
    assert any("eval_loss" in m for m in metrics(out))
    plain = train(**quick_args(tmp_path / "u", max_steps=2, save_steps=0, max_samples=0))
    packed = train(**quick_args(tmp_path / "p", packing=True, max_steps=2, save_steps=0, max_samples=0))
    assert json.loads((Path(packed) / "run.json").read_text())["metrics"]["global_step"] == 2
    # ~80-token rows packed into 2048-token sequences: each step sees many more tokens than 8 single rows.
    assert metrics(packed)[0]["tokens_seen"] > 5 * metrics(plain)[0]["tokens_seen"]


def test_packed_rows_do_not_attend_to_each_other_on_the_plain_path(tmp_path, monkeypatch, caplog):
    """--packing without flash attention (the CPU / plain path): transformers masks attention per packed row from
    the position ids in training, so a row packed after another gives the logits it gives alone, and TRL's
    cross-contamination warning (meant for other setups) is not shown."""
    import torch
    import transformers.masking_utils as masking
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(TINY, attn_implementation="sdpa").eval()
    a, b = torch.tensor([[1, 50, 60, 70, 80]]), torch.tensor([[1, 90, 91, 92]])
    with torch.no_grad():  # no KV cache, as in training: with one, transformers would not look for packed rows
        packed = model(input_ids=torch.cat([a, b], 1), position_ids=torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3]]),
                       use_cache=False).logits
        alone = model(input_ids=b, use_cache=False).logits
    assert torch.allclose(packed[0, 5:], alone[0], atol=1e-5)
    found, real = [], masking.find_packed_sequence_indices
    monkeypatch.setattr(masking, "find_packed_sequence_indices", lambda pos: found.append(real(pos)) or found[-1])
    with caplog.at_level(logging.WARNING):
        train(**quick_args(tmp_path, packing=True, max_steps=2, save_steps=0, max_samples=16))
    rows = [int(m[:, -1].max()) + 1 for m in found if m is not None]
    assert rows and max(rows) > 1, found  # the training forward passes saw several rows per sequence, kept apart
    assert "cross-contamination" not in caplog.text


def test_sharegpt_turns_in_a_messages_column_are_converted_too(tmp_path):
    # Arrow unifies mixed rows, so the role/content row also carries from/value keys (as None) and vice versa.
    path = write_jsonl(tmp_path / "mixed.jsonl", [
        {"messages": [{"from": "system", "value": "be brief"}, {"from": "human", "value": "hi"},
                      {"from": "gpt", "value": "yo"}]},
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}])
    rows, info = prepared(data.load_dataset_any(path), prompts.load("chatml"), "</s>")
    assert info["rows_used"] == 2
    assert rows[0]["messages"] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                                   {"role": "assistant", "content": "yo"}]
    assert rows[1]["messages"] == [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    odd = Dataset.from_list([{"messages": [{"speaker": "u", "text": "hi"}]}])
    with pytest.raises(UserError, match="row 1: turn 1 has neither a role nor a from key"):
        prepared(odd, prompts.load("chatml"), "</s>")
