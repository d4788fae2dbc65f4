"""Samples during training: answered at save / eval steps, written to samples.jsonl, sent to the run's loggers."""

import json

import pytest
import torch
from transformers import (AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerControl, TrainerState,
                          TrainingArguments)

from conftest import TINY, write_jsonl
from sftkit import prompts, samples
from sftkit.errors import UserError

FIELDS = {"step", "prompt", "answer", "stopped", "tokens"}


@pytest.fixture
def tiny():
    tok = AutoTokenizer.from_pretrained(TINY)
    template = prompts.load("llama-3.1-chat")
    prompts.attach(tok, template)
    return AutoModelForCausalLM.from_pretrained(TINY), tok, template


def lines(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_read_prompts_file_jsonl_and_text(tmp_path):
    jsonl = write_jsonl(tmp_path / "p.jsonl", [{"instruction": "요약해 줘", "input": "긴 글"}, {"prompt": "안녕"},
                                               "문자열 프롬프트", {"instruction": "q", "system": "짧게"}])
    assert samples.read_prompts_file(jsonl) == [
        {"instruction": "요약해 줘", "input": "긴 글", "system": ""}, {"instruction": "안녕", "input": "", "system": ""},
        {"instruction": "문자열 프롬프트", "input": "", "system": ""}, {"instruction": "q", "input": "", "system": "짧게"}]
    text = tmp_path / "p.txt"
    text.write_text("첫 질문\n\n  둘째 질문  \n", encoding="utf-8")
    assert [p["instruction"] for p in samples.read_prompts_file(text)] == ["첫 질문", "둘째 질문"]


def test_read_prompts_file_errors_name_the_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "ok"}\n{"instruction": \n', encoding="utf-8")
    with pytest.raises(UserError, match="line 2 is not JSON"):
        samples.read_prompts_file(bad)
    bad.write_text('{"instruction": "ok"}\n{"output": "x"}\n', encoding="utf-8")
    with pytest.raises(UserError, match="line 2 has no non-empty"):
        samples.read_prompts_file(bad)
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(UserError, match="empty"):
        samples.read_prompts_file(tmp_path / "empty.txt")
    with pytest.raises(UserError, match="does not exist"):
        samples.read_prompts_file(tmp_path / "missing.jsonl")


def test_save_and_eval_hooks_write_one_round_per_step(tiny, tmp_path):
    model, tok, template = tiny
    model.gradient_checkpointing_enable()
    model.train()
    cb = samples.SampleCallback([], template, tok, max_new_tokens=8, path=tmp_path)  # [] -> the built-in prompts
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    state, control = TrainerState(global_step=5), TrainerControl()
    cb.on_save(args, state, control, model=model)
    cb.on_evaluate(args, state, control, model=model)  # the same step: no second round
    rows = lines(tmp_path / "samples.jsonl")
    assert [r["prompt"] for r in rows] == [p["instruction"] for p in samples.DEFAULT_PROMPTS]
    assert all(set(r) == FIELDS and r["step"] == 5 for r in rows)
    assert all(isinstance(r["stopped"], bool) and (r["stopped"] or r["tokens"] == 8) for r in rows)
    assert model.training and model.is_gradient_checkpointing  # back to training as it was
    state.global_step = 6
    cb.on_evaluate(args, state, control, model=model)
    assert [r["step"] for r in samples.last_samples(tmp_path)] == [6, 6, 6]
    assert len(lines(tmp_path / "samples.jsonl")) == 6


def test_stopped_is_true_when_the_answer_ends_on_a_stop_id(tiny, tmp_path):
    model, tok, template = tiny
    with torch.no_grad():  # a model whose every next token is <|end_of_text|> (1) or <|eot_id|> (4)
        head = model.get_output_embeddings().weight
        head.zero_()
        model.model.norm.weight.zero_()
        model.model.norm.weight[0] = 1.0
        head[4, 0], head[1, 0] = 10.0, -10.0
    cb = samples.SampleCallback(["안녕?"], template, tok, max_new_tokens=8, path=tmp_path / "samples.jsonl")
    rows = cb.sample(TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True),
                     TrainerState(global_step=1), model)
    assert rows == [{"step": 1, "prompt": "안녕?", "answer": "", "stopped": True, "tokens": 0}]
    assert samples.last_samples(tmp_path) == rows


def test_a_short_training_writes_samples_at_each_save(tiny, tmp_path):
    from datasets import Dataset

    model, tok, template = tiny
    ids = tok("안녕하세요. 반갑습니다.")["input_ids"]
    data = Dataset.from_list([{"input_ids": ids, "labels": ids}] * 4)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, save_steps=1, per_device_train_batch_size=2,
                             report_to="none", use_cpu=True, logging_steps=1, save_strategy="steps")
    trainer = Trainer(model=model, args=args, train_dataset=data)
    samples.SampleCallback(["한 문장으로 답해 줘."], template, tok, max_new_tokens=4, path=tmp_path).add_to(trainer)
    trainer.train()
    rows = lines(tmp_path / "samples.jsonl")
    assert [r["step"] for r in rows] == [1, 2]  # the end of training is step 2 again: no extra round
    assert all(set(r) == FIELDS and r["prompt"] == "한 문장으로 답해 줘." for r in rows)


def test_samples_go_to_the_trainers_tensorboard_and_wandb(tiny, tmp_path):
    model, tok, template = tiny
    calls = []

    class Writer:
        def add_text(self, tag, text, step):
            calls.append(("tb", tag, step, text))

        def flush(self):
            pass

    class Wandb:
        run = object()

        @staticmethod
        def Table(columns, data):
            return {"columns": columns, "data": data}

        @staticmethod
        def log(values):
            calls.append(("wandb", values))

    tensorboard = type("TensorBoardCallback", (), {"tb_writer": Writer()})()
    wandb = type("WandbCallback", (), {"_wandb": Wandb})()
    cb = samples.SampleCallback(["질문"], template, tok, max_new_tokens=2, path=tmp_path)
    cb.handler = type("Handler", (), {"callbacks": [tensorboard, wandb]})()
    rows = cb.sample(TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True),
                     TrainerState(global_step=3), model)
    assert calls[0][:3] == ("tb", "samples/0", 3) and calls[0][3].startswith("**질문**")
    assert calls[1] == ("wandb", {"samples": {"columns": ["step", "prompt", "answer", "stopped", "tokens"],
                                              "data": [list(rows[0].values())]}, "train/global_step": 3})


def test_a_system_prompt_needs_a_chat_template(tmp_path):
    tok = AutoTokenizer.from_pretrained(TINY)
    with pytest.raises(UserError, match="needs a chat template"):
        samples.SampleCallback([{"instruction": "q", "system": "짧게"}], prompts.load("alpaca_ko"), tok, path=tmp_path)
    assert samples.last_samples(tmp_path) == []


def test_a_resumed_run_drops_rounds_past_its_checkpoint_and_show_lists_the_last(tmp_path):
    path = tmp_path / "samples.jsonl"
    rows = [{"step": s, "prompt": "q", "answer": f"a{s}", "stopped": s < 30, "tokens": 4} for s in (10, 20, 30)]
    write_jsonl(path, rows)
    with path.open("a", encoding="utf-8") as f:
        f.write('{"step": 40, "prompt": "q", "ans')  # a write cut short by a kill
    assert samples.last_samples(tmp_path) == [rows[2]]
    cb = samples.SampleCallback(["q"], prompts.load("alpaca_ko"), None, path=path)
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    cb.on_train_begin(args, TrainerState(global_step=20), TrainerControl())
    assert lines(path) == rows[:2]
    assert samples.summary(samples.last_samples(tmp_path)) == ["samples at step 20 (greedy):", "  Q: q", "  A: a20",
                                                               "     (stopped)"]
    assert samples.summary([{**rows[2], "answer": "x" * 400}])[2:] == ["  A: " + "x" * 300 + "...",
                                                                       "     (did NOT stop within 4 tokens)"]


@pytest.mark.gpu
def test_samples_during_unsloth_training(tmp_path):
    from test_chat_template import CHAT, unsloth_tiny, unsloth_trainer

    model, tok, fast = unsloth_tiny()
    template = prompts.load("llama-3.1-chat")
    prompts.attach(tok, template)
    trainer = unsloth_trainer(model, tok, fast, [{"messages": CHAT}] * 4, tmp_path, assistant_only_loss=True,
                              save_steps=1, save_strategy="steps")
    samples.SampleCallback([], template, tok, max_new_tokens=8, path=tmp_path,
                           modes=(fast.for_inference, fast.for_training)).add_to(trainer)
    trainer.train()
    rows = lines(tmp_path / "samples.jsonl")
    assert [r["step"] for r in rows] == [1] * 3 + [2] * 3 and all(set(r) == FIELDS for r in rows)
    assert len([h for h in trainer.state.log_history if "loss" in h]) == 2  # training went on after sampling
