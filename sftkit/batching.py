"""Fast mode: the same effective batch in fewer, larger micro-batches, as large as the GPU holds.

Why it is faster: the notebook's micro-batch of 2 rows (~650 tokens) leaves an H100 waiting on per-kernel
launch overhead; 8 rows per kernel do 4x the work for about the same overhead. What it changes: only how the
rows of one optimizer step are split. The rows, their order, the learning rate schedule and the number of
optimizer steps stay the same, and the loss is normalised over all tokens of the step (transformers passes
num_items_in_batch), so each optimizer step sees the same gradient up to floating-point summation order.
"""

import logging

from . import estimate
from .errors import UserError

log = logging.getLogger("sftkit")
BUDGET = 0.85  # of the card: the estimate is a worst case, but leave room for fragmentation and other tenants


def plan(model_name: str, per_device: int, accum: int, max_seq_length: int, r: int, target_modules, optim: str,
         gradient_checkpointing: bool, choice) -> dict:
    """Returns {"per_device_train_batch_size", "gradient_accumulation_steps", "reason", "estimate_gib"}."""
    effective = per_device * accum
    divisors = [d for d in range(effective, 0, -1) if effective % d == 0]
    if not choice.device.startswith("cuda"):
        return {"per_device_train_batch_size": effective, "gradient_accumulation_steps": 1,
                "reason": "CPU: no GPU memory to budget, whole effective batch in one micro-batch"}
    import torch

    capacity = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / estimate.GIB
    try:
        cfg, _ = estimate.load_config(model_name)
    except UserError:
        return {"per_device_train_batch_size": per_device, "gradient_accumulation_steps": accum,
                "reason": "model shape unknown offline, so the micro-batch is kept as given"}
    mods = [m for m in target_modules if m in estimate.MODULES] or list(estimate.MODULES)
    for micro in divisors:
        est = estimate.estimate(cfg, max_seq_length, micro, r, mods, gradient_checkpointing,
                                optim if optim in estimate.OPTIMIZER_STATE_BYTES else "adamw_8bit", capacity)
        if est["total_gib"] <= BUDGET * capacity:
            return {"per_device_train_batch_size": micro, "gradient_accumulation_steps": effective // micro,
                    "estimate_gib": round(est["total_gib"], 2),
                    "reason": f"largest micro-batch whose worst-case estimate ({est['total_gib']:.1f} GiB at "
                              f"{max_seq_length} tokens/row) is within {int(BUDGET * 100)}% of {capacity:.1f} GiB"}
    return {"per_device_train_batch_size": per_device, "gradient_accumulation_steps": accum,
            "reason": "even a micro-batch of 1 is estimated not to fit; kept as given"}


def warm_up(model, tokenizer, rows, micro_batch: int, max_length: int, optim: str, choice):
    """One throw-away optimizer step at learning rate 0 before the real trainer starts (fast mode, Unsloth).

    Measured on an H100 (benchmarks/results/profile-twice.json): the first SFTTrainer in a process ran the
    8B model at ~2 s per step and a second one, same model and settings, at ~0.65 s. A step at lr 0 changes
    no weight (AdamW's update and decay are both scaled by lr), its optimizer is discarded, and the real
    trainer re-seeds itself, so what is learned is unchanged.
    """
    import tempfile

    from trl import SFTConfig, SFTTrainer

    with tempfile.TemporaryDirectory() as tmp:
        args = SFTConfig(output_dir=tmp, per_device_train_batch_size=micro_batch, gradient_accumulation_steps=1,
                         max_steps=1, learning_rate=0.0, weight_decay=0.0, warmup_steps=0, optim=optim,
                         bf16=choice.dtype == "bf16", fp16=choice.dtype == "fp16", max_length=max_length,
                         report_to="none", save_strategy="no", logging_strategy="no", gradient_checkpointing=False,
                         dataset_num_proc=None, disable_tqdm=True)
        SFTTrainer(model=model, processing_class=tokenizer, args=args,
                   train_dataset=rows.select(range(min(micro_batch, len(rows))))).train()
