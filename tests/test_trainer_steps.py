"""The training steps' policy, each reached without a training run: SFTConfig fields, how a fast plan is
applied, what the record says, and the advice after running out of memory."""

import re

import pytest
from transformers import AutoTokenizer

from conftest import TINY, checkpoint
from sftkit import advice, prompts, trainer
from sftkit.backend import Choice
from sftkit.errors import UserError
from sftkit.runrecord import starting_record

CPU = Choice("hf", "cpu", "CPU", "fp32", "test")
GPU_HF = Choice("hf", "cuda:0", "Tesla T4", "fp16", "test")
GPU_UNSLOTH = Choice("unsloth", "cuda:0", "Tesla T4", "fp16", "test")


def args(**over):
    """train()'s defaults, as check_args returns them."""
    import inspect

    from train_unsloth import train

    a = {n: p.default for n, p in inspect.signature(train).parameters.items()}
    a.update(over)
    return trainer.check_args(a)


def test_check_args_names_the_folder_and_splits_the_modules():
    a = args(model_name="unsloth/Meta-Llama-3.1-8B", dataset="data/my set.jsonl", target_modules="q_proj, v_proj,")
    assert a["output_dir"] == "outputs/Meta-Llama-3.1-8B-my_set" and a["target_modules"] == ["q_proj", "v_proj"]
    with pytest.raises(UserError, match="names no layer"):
        args(target_modules=" , ")


@pytest.mark.parametrize("choice, asked, trainer_ckpt", [
    (GPU_HF, True, True),  # the plain path on a GPU: the Trainer checkpoints
    (GPU_UNSLOTH, True, False),  # Unsloth checkpoints itself (offloaded), set in get_peft_model
    (CPU, True, False),  # nothing to save on a CPU
    (GPU_HF, False, False),
])
def test_sft_config_follows_the_notebook_the_plan_and_the_backend(tmp_path, choice, asked, trainer_ckpt):
    a = args(output_dir=str(tmp_path), save_steps=0, report_to="none")
    plan = trainer.Plan(per_device=8, accum=1, checkpointing=asked)
    if choice.cuda:  # SFTConfig checks fp16 against the machine; only the field matters here
        pytest.importorskip("torch").cuda.is_available() or pytest.skip("SFTConfig(fp16=True) needs a CUDA GPU")
    config = trainer.sft_config(a, choice, plan, has_eval=False, world_size=1, chat=False)
    assert (config.per_device_train_batch_size, config.gradient_accumulation_steps) == (8, 1)
    assert config.gradient_checkpointing is trainer_ckpt
    assert (config.learning_rate, config.weight_decay, config.warmup_steps, config.max_steps) == (2e-4, 0.01, 5, 60)
    assert config.lr_scheduler_type == "linear" and config.seed == 3407 and config.max_length == 2048
    assert config.save_strategy == "no" and config.completion_only_loss is True


def test_sft_config_on_a_cpu(tmp_path):
    a = args(output_dir=str(tmp_path), val_size=0.1, train_on_inputs=True, save_steps=20)
    config = trainer.sft_config(a, CPU, trainer.Plan(2, 4, True), has_eval=True, world_size=1, chat=True)
    assert config.use_cpu and config.ddp_backend is None and not config.bf16 and not config.fp16
    assert config.eval_strategy == "steps" and config.eval_steps == 20 and config.save_steps == 20
    assert config.completion_only_loss is False and config.assistant_only_loss is False  # --train_on_inputs
    assert config.loss_type == "chunked_nll"  # TRL's memory-saving default, where nothing wraps lm_head
    wrapped = trainer.sft_config(a, CPU, trainer.Plan(2, 4, True), True, 1, chat=True, head_wrapped=True)
    assert wrapped.loss_type == "nll"  # trainable token rows / --train_embeddings: the loss must go through peft


def test_a_fast_plan_changes_only_the_local_split():
    a = args(fast=True, per_device_train_batch_size=2, gradient_accumulation_steps=4)
    seen = {}

    def planner(model, per_device, accum, longest, *rest, **kw):
        seen.update(per_device=per_device, accum=accum, longest=longest, packed=kw["packed"])
        return {"per_device_train_batch_size": 8, "gradient_accumulation_steps": 1, "gradient_checkpointing": False,
                "reason": "fits"}

    plan = trainer.plan_batches(a, GPU_UNSLOTH, 700, 1, planner=planner)
    assert (plan.per_device, plan.accum, plan.checkpointing) == (8, 1, False)
    assert plan.fast["requested"] == [2, 4] and plan.fast["longest_row"] == 700
    assert seen == {"per_device": 2, "accum": 4, "longest": 700, "packed": False}
    assert a["per_device_train_batch_size"] == 2  # the record keeps what was asked, so --resume re-plans
    assert trainer.plan_batches(args(), GPU_UNSLOTH, 700, 1, planner=planner) == trainer.Plan(2, 4, True)


def test_the_record_names_the_tokens_the_run_trained_with():
    tok = AutoTokenizer.from_pretrained(TINY)
    a = args(model_name=TINY)
    rec = starting_record(a, CPU, prompts.load("alpaca_ko"), {"format": "alpaca"}, [], None, 1, None, tok)
    assert rec.tokens["eos"] == {"token": tok.eos_token, "id": tok.eos_token_id}
    assert rec.model_path.endswith("examples/tiny-llama") and rec.template == "alpaca_ko" and rec.fast is None
    assert rec.status == "running" and rec.versions["transformers"]


@pytest.mark.parametrize("settled, has_ckpt, fast, expect", [
    ("restored", False, False, "previous run in .* is back, unchanged; try again with --overwrite with a lower"),
    ("", True, False, "checkpoints in .* are kept: continue with --resume with a lower --per_device"),
    ("", False, True, "No checkpoint was saved yet: start again with --overwrite without --fast \\(it picked "
                      "micro-batch 8 with gradient checkpointing off\\)"),
])
def test_out_of_memory_advice_fits_what_is_left(tmp_path, settled, has_ckpt, fast, expect):
    if has_ckpt:
        checkpoint(tmp_path, 2)
    said = advice.oom_advice(str(tmp_path), settled, fast, 8, False)
    assert re.search(expect, said), said
    assert "memory_report.py estimate" in said


def test_a_second_ctrl_c_says_what_was_kept_and_what_to_type(tmp_path):
    """A second Ctrl-C aborts without saving the current step: the message said only "interrupted", and a run
    aborted before its first checkpoint had lost every step without a word."""
    said = advice.aborted_advice(str(tmp_path), "")
    assert "before the first checkpoint, so no step was saved" in said and "--overwrite" in said
    assert "is back, unchanged" in advice.aborted_advice(str(tmp_path), "restored")
    checkpoint(tmp_path, 4)
    assert "checkpoint-4, is kept: continue with python train_unsloth.py --resume" in advice.aborted_advice(
        str(tmp_path), "kept")


def test_who_checkpoints_is_the_backends_answer():
    """The rule SFTConfig takes, on every machine (the SFTConfig cases above need a GPU for fp16)."""
    assert GPU_HF.trainer_checkpointing(True) and not GPU_HF.trainer_checkpointing(False)
    assert not GPU_UNSLOTH.trainer_checkpointing(True) and not CPU.trainer_checkpointing(True)
    assert (GPU_UNSLOTH.cuda, GPU_UNSLOTH.unsloth, CPU.cuda, GPU_HF.unsloth) == (True, True, False, False)
