"""Fast mode: the same effective batch in fewer, larger micro-batches, as large as the GPU holds.

Why it is faster: the notebook's micro-batch of 2 rows (~650 tokens) leaves an H100 waiting on per-kernel
launch overhead; 8 rows per kernel do 4x the work for about the same overhead. Where the memory estimate
allows (Unsloth backend), it also turns gradient checkpointing off, which saves recomputing the forward pass,
even at half the micro-batch once micro-batches are large enough to keep the GPU busy.
What it changes: only how the rows of one optimizer step are split, and whether activations are kept or
recomputed. The rows, their order, the learning rate schedule and the number of optimizer steps stay the same,
and the loss is normalised over all tokens of the step (transformers passes num_items_in_batch), so each
optimizer step sees the same gradient up to floating-point summation order.
"""

from . import estimate
from .errors import UserError

BUDGET = 0.85  # of the memory this process can use: the estimate is a worst case, but leave room for fragmentation
# Packed micro-batches (every row max_seq_length long) reserved more than the batch-2 calibration predicts:
# 8 x 2048 packed tokens with checkpointing, 8B shape, H100: 11.8 GB reserved against 9.6 GiB estimated.
PACKED_RESERVE = 1.25
# Packed tokens per micro-batch from which half the micro-batch without checkpointing is taken over the full one
# with it. Measured on an H100, 8B shape (benchmarks/README.md, run G): 4 x 2048 packed tokens without
# checkpointing ran at 1.47x the tokens/s of 8 x 2048 with it. Smaller micro-batches are bound by kernel launches
# (2,000 tokens: the GPU busy 59% of the step), where halving the micro-batch is not measured to pay, so there
# the larger micro-batch keeps precedence.
GPU_BOUND_TOKENS = 8192


def plan(model_name: str, per_device: int, accum: int, seq_len: int, r: int, target_modules, optim: str,
         gradient_checkpointing: bool, choice, capacity: float = 0.0, packed: bool = False, world: int = 1,
         train_embeddings: bool = False) -> dict:
    """Returns {"per_device_train_batch_size", "gradient_accumulation_steps", "gradient_checkpointing", "reason",
    "estimate_gib"}. `seq_len` is the longest row the run can see (the data's longest, capped by max_seq_length);
    `capacity` is the GiB this process can use (0: free GPU memory plus what it holds already, or the card's
    total when `world` > 1, so that every rank makes the same plan); `packed`: rows are packed to seq_len.

    For each setting of gradient checkpointing (off, and on when the user allowed it), the largest micro-batch
    that fits; off wins where its micro-batch is as large, or at least half as large and, packed, big enough to
    keep the GPU busy (worth_dropping). Dropping checkpointing removes the recomputed forward pass and the
    activation copies to the CPU; the gradients are the same."""
    effective = per_device * accum
    divisors = [d for d in range(effective, 0, -1) if effective % d == 0]
    keep = {"per_device_train_batch_size": per_device, "gradient_accumulation_steps": accum,
            "gradient_checkpointing": gradient_checkpointing}
    if not choice.cuda:
        return {**keep, "per_device_train_batch_size": effective, "gradient_accumulation_steps": 1,
                "reason": "CPU: no GPU memory to budget, whole effective batch in one micro-batch"}
    if not capacity:
        import torch

        # What this process may grow into: memory free on the card plus what it already holds (the loaded
        # model, which the estimate counts). Another process on the same GPU (a second notebook kernel, say)
        # shrinks it; the card's total would overcommit. Under torchrun every rank must pick the same split
        # (DDP syncs once per micro-batch), and free memory can differ between ranks: use the card's total.
        free, total = torch.cuda.mem_get_info()
        capacity = (total if world > 1 else free + torch.cuda.memory_reserved()) / estimate.GIB
        # A cap set with torch.cuda.set_per_process_memory_fraction (a shared GPU, or benchmarks/bench_train.py
        # --memory_cap_gb pretending to be a T4) is invisible to mem_get_info but binds the allocator.
        fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda: 1.0)()
        capacity = min(capacity, fraction * total / estimate.GIB)
    try:
        cfg, _ = estimate.load_config(model_name)
    except UserError:
        return {**keep, "reason": "model shape unknown offline, so the micro-batch is kept as given"}
    mods = [m for m in target_modules if m in estimate.MODULES] or list(estimate.MODULES)
    opt = optim if optim in estimate.OPTIMIZER_STATE_BYTES else "adamw_8bit"
    # The estimate was measured on Unsloth's offloaded checkpointing; only there may fast mode drop it.
    unsloth = choice.unsloth
    fits = {}  # checkpointing on/off -> (largest micro-batch that fits, its estimate)
    for ckpt in ([False, True] if gradient_checkpointing and unsloth else [gradient_checkpointing]):
        for micro in divisors:
            est = estimate.estimate(cfg, seq_len, micro, r, mods, ckpt, opt, capacity, train_embeddings)
            need = est["total_gib"] * (PACKED_RESERVE if packed else 1.0)
            if not unsloth:  # the estimate is Unsloth's: the plain path also upcasts and keeps layer inputs
                need += estimate.hf_extra_gib(estimate.normalise(cfg), seq_len, micro)
            if need <= BUDGET * capacity:
                fits[ckpt] = (micro, need)
                break
    if not fits:
        return {**keep, "reason": "even a micro-batch of 1 is estimated not to fit; kept as given"}
    ckpt = min(fits)  # False (no checkpointing) where it fits at all...
    if ckpt is False and True in fits and not worth_dropping(fits[False][0], fits[True][0], seq_len, packed):
        ckpt = True  # ...unless that needs a much smaller micro-batch than checkpointing allows
    micro, need = fits[ckpt]
    how = "with" if ckpt else "without"
    rows = "packed to max_seq_length" if packed else "the longest row"
    other = fits.get(not ckpt)
    versus = "" if other is None else f"; {'without' if ckpt else 'with'} it the largest is {other[0]}"
    return {"per_device_train_batch_size": micro, "gradient_accumulation_steps": effective // micro,
            "gradient_checkpointing": ckpt, "estimate_gib": round(need, 2),
            "reason": f"largest micro-batch whose worst-case estimate {how} gradient checkpointing "
                      f"({need:.1f} GiB at {seq_len} tokens/row, {rows}) is within "
                      f"{int(BUDGET * 100)}% of the {capacity:.1f} GiB this process can use{versus}"}


def worth_dropping(micro_free: int, micro_ckpt: int, seq_len: int, packed: bool) -> bool:
    """Is micro-batch `micro_free` without checkpointing faster than `micro_ckpt` with it?
    Checkpointing recomputes the forward pass: about a third more GPU work. A smaller micro-batch costs another
    round of kernel launches per optimizer step, which matters only while launches, not the GPU, set the pace.
    Only packed rows are known to hold seq_len tokens each; unpacked, seq_len is the longest row, not the size."""
    if micro_free >= micro_ckpt:
        return True
    return packed and 2 * micro_free >= micro_ckpt and micro_free * seq_len >= GPU_BOUND_TOKENS
