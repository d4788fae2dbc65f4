"""The --fast plan (sftkit/fastplan.py): the largest micro-batch the memory estimate fits, checkpointing off only
where that wins, sized to what this process may use."""


def test_fast_plan_prefers_no_checkpointing_where_the_estimate_fits():
    from sftkit.backend import Choice
    from sftkit.fastplan import plan
    from sftkit.estimate import MODULES

    gpu = Choice("unsloth", "cuda:0", "GPU", "bf16", "test")
    h100 = plan("unsloth/Meta-Llama-3.1-8B", 2, 4, 1300, 16, MODULES, "adamw_8bit", True, gpu, capacity=79.1)
    assert (h100["per_device_train_batch_size"], h100["gradient_accumulation_steps"]) == (8, 1)
    assert h100["gradient_checkpointing"] is False and h100["estimate_gib"] <= 0.85 * 79.1
    t4 = plan("unsloth/Meta-Llama-3.1-8B", 2, 4, 1300, 16, MODULES, "adamw_8bit", True, gpu, capacity=14.7)
    assert t4["gradient_checkpointing"] is True and t4["estimate_gib"] <= 0.85 * 14.7  # 8B without it needs > 40 GiB
    # A user who turned checkpointing off keeps it off; the micro-batch shrinks until the estimate fits instead.
    off = plan("unsloth/Meta-Llama-3.1-8B", 2, 4, 2048, 16, MODULES, "adamw_8bit", False, gpu, capacity=40.0)
    assert off["gradient_checkpointing"] is False and off["per_device_train_batch_size"] < 8
    assert off["per_device_train_batch_size"] * off["gradient_accumulation_steps"] == 8
    # The hf backend keeps checkpointing: the estimate without it was measured on Unsloth only.
    hf = plan("unsloth/Meta-Llama-3.1-8B", 2, 4, 1300, 16, MODULES, "adamw_8bit", True,
              Choice("hf", "cuda:0", "GPU", "bf16", "test"), capacity=79.1)
    assert hf["gradient_checkpointing"] is True and hf["per_device_train_batch_size"] == 8
    # Packed rows are all max_seq_length long and plan at 1.25x: 8 x 2048 fits only with checkpointing, 4 x 2048
    # without. 4 x 2048 tokens keep the GPU busy, so two micro-batches beat one with the forward pass recomputed
    # (measured 1.47x on an H100).
    packed = plan("unsloth/Meta-Llama-3.1-8B", 2, 4, 2048, 16, MODULES, "adamw_8bit", True, gpu, capacity=77.9,
                  packed=True)
    assert (packed["per_device_train_batch_size"], packed["gradient_accumulation_steps"]) == (4, 2)
    assert packed["gradient_checkpointing"] is False and packed["reason"].endswith("with it the largest is 8")
    # Unpacked, seq_len is only the longest row (most rows are far shorter), so half the micro-batch is not known
    # to keep the GPU busy: on 40 GiB, 8 x 1 with checkpointing beats 4 x 2 without.
    mid = plan("unsloth/Meta-Llama-3.1-8B", 2, 4, 1178, 16, MODULES, "adamw_8bit", True, gpu, capacity=40.0)
    assert (mid["per_device_train_batch_size"], mid["gradient_checkpointing"]) == (8, True)
    assert mid["reason"].endswith("without it the largest is 4")
    # Short rows: micro-batches of a few hundred tokens are bound by kernel launches, so the larger micro-batch
    # with checkpointing wins over half of it without (on 11 GiB: 2 x 300 tokens fit without it, 4 x 300 with).
    small = plan("unsloth/Meta-Llama-3.1-8B", 2, 2, 300, 16, MODULES, "adamw_8bit", True, gpu, capacity=11.0)
    assert small["gradient_checkpointing"] is True and small["per_device_train_batch_size"] == 4


def test_fast_plan_respects_a_per_process_memory_cap(monkeypatch):
    """mem_get_info reports the whole card even when torch.cuda.set_per_process_memory_fraction capped the
    process (a shared GPU, or a T4 rehearsal on a larger card): the plan must size to the cap."""
    import torch

    from sftkit.backend import Choice
    from sftkit.fastplan import plan
    from sftkit.estimate import GIB, MODULES

    gpu = Choice("unsloth", "cuda:0", "GPU", "bf16", "test")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (int(79 * GIB), int(79.2 * GIB)))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda: 0)
    args = ("unsloth/Meta-Llama-3.1-8B", 2, 4, 1178, 16, MODULES, "adamw_8bit", True, gpu)
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda: 1.0)
    whole = plan(*args)
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda: 15 / 79.2)
    capped = plan(*args)
    assert whole["gradient_checkpointing"] is False  # 47 GiB without checkpointing fits 85% of 79 GiB...
    assert capped["gradient_checkpointing"] is True and capped["estimate_gib"] <= 0.85 * 15  # ...not of 15
    assert "15.0 GiB" in capped["reason"]
