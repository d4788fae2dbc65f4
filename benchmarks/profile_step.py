"""Where an optimizer step's time goes: GPU kernel time vs wall time, and how many kernels were launched.

    python benchmarks/profile_step.py --model_dir .bench-cache/llama-3.1-8b --configs 2x4,8x1

Loads the model once (Unsloth on a GPU), then for each micro-batch x accumulation config trains a few steps
on the synthetic Korean-length rows and profiles one step with torch.profiler. If the GPU is busy for only a
small part of the wall time, the step is bound by the CPU issuing kernels, not by the GPU.
"""

import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))


def main(model_dir: str, configs: str = "2x4,8x1", steps: int = 4, backend: str = "auto", extra: str = "",
         out: str = "", checkpointing: bool = True, dtype: str = "auto", top: int = 8):
    """Profile one optimizer step (the last of `steps`) for each config.

    Args:
      model_dir: model folder (benchmarks/shapes.py builds one).
      configs: comma-separated micro-batch x accumulation pairs, e.g. 2x4,8x1.
      steps: steps per config; the last one is profiled.
      backend: auto | unsloth | hf.
      extra: JSON of further SFTConfig fields for configs marked with a '+' (e.g. 8x1+), to test one setting.
      out: JSON path for the results.
      checkpointing: Unsloth's offloaded gradient checkpointing (fast mode turns it off where memory allows).
      dtype: auto | fp16 (a T4's, for the rehearsal under ../shared/gpu/t4.sh) | bf16.
      top: how many of the kernels that took the most GPU time to list per config.
    """
    from sftkit import estimate
    from sftkit.backend import add_lora, choose, load_model  # unsloth first, when chosen
    from sftkit.backend.models import trainables_to_fp32

    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from shapes import parse_config, prepared_rows, profiler_counts
    from sftkit.cli import names as listed

    choice = choose(backend, dtype)
    model, tok, _ = load_model(model_dir, 2048, choice, load_in_4bit=True)
    model = add_lora(model, choice, 16, 16, 0.0, list(estimate.MODULES), checkpointing, 3407, True)
    rows = prepared_rows(Path("/tmp/sftkit-bench/profile.jsonl"), 256, tok)

    class Profile(TrainerCallback):
        def __init__(self):
            self.prof, self.t0, self.tokens0 = None, None, 0

        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == steps - 1:
                torch.cuda.synchronize()
                self.tokens0 = state.num_input_tokens_seen
                self.prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
                self.prof.__enter__()
                self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if self.prof is not None and self.t0 is not None and state.global_step == steps:
                torch.cuda.synchronize()
                self.wall = time.perf_counter() - self.t0
                self.prof.__exit__(None, None, None)
                self.tokens = state.num_input_tokens_seen - self.tokens0
                self.t0 = None

    results = []
    for cfg in listed(configs):
        micro, accum, more = parse_config(cfg, extra)
        cb = Profile()
        args = SFTConfig(output_dir="/tmp/sftkit-bench/prof", per_device_train_batch_size=micro,
                         gradient_accumulation_steps=accum, max_steps=steps, learning_rate=2e-4, optim="adamw_8bit",
                         bf16=choice.dtype == "bf16", fp16=choice.dtype == "fp16", logging_steps=1, report_to="none",
                         save_strategy="no", gradient_checkpointing=False, max_length=2048, dataset_num_proc=None,
                         include_num_input_tokens_seen="non_padding", **more)
        trainer = SFTTrainer(model=model, processing_class=tok, train_dataset=rows, args=args, callbacks=[cb])
        shapes = count_positions(trainer)
        if choice.dtype == "fp16":  # the gradient scaler takes fp32 LoRA weights only (train_unsloth's runs have them)
            print("trainable dtypes:", sorted({str(p.dtype) for p in trainer.model.parameters() if p.requires_grad}))
            trainables_to_fp32(trainer.model)
        res = trainer.train()
        gpu_us, launches, _ = profiler_counts(cb.prof.events())
        heaviest = sorted(cb.prof.key_averages(), key=lambda e: -e.self_device_time_total)[:top]
        r = {"config": cfg, "extra": more, "wall_s": round(cb.wall, 3), "gpu_kernel_s": round(gpu_us / 1e6, 3),
             "gpu_busy_pct": round(100 * gpu_us / 1e6 / cb.wall, 1), "kernel_launches": launches,
             "cpu_us_per_launch": round(cb.wall * 1e6 / max(launches, 1), 1), "tokens": cb.tokens,
             "tokens_per_s": round(cb.tokens / cb.wall, 1),
             "avg_step_s_all_steps": round(res.metrics["train_runtime"] / steps, 3),
             # positions the model ran per real token, over all steps: 1.0 when padding-free, above it when padded
             "positions_per_token": round(shapes["positions"] / max(shapes["tokens"], 1), 3),
             "top_kernels": [[e.key[:60], round(e.self_device_time_total / 1e3, 1), e.count] for e in heaviest]}
        results.append(r)
        print(json.dumps(r), flush=True)
        del trainer
    report = {"model_dir": str(model_dir), "backend": choice.backend, "checkpointing": checkpointing,
              "device": torch.cuda.get_device_name(0),
              "results": results}
    if out:
        Path(out).write_text(json.dumps(report, indent=2))


def count_positions(trainer) -> dict:
    """Wraps the trainer's collator to count the positions each batch makes the model run (input_ids cells) and the
    real tokens among them (attention mask, else all): whether a larger micro-batch pays for padding."""
    seen = {"positions": 0, "tokens": 0}
    collate = trainer.data_collator

    def counted(features):
        batch = collate(features)
        ids = batch["input_ids"]
        seen["positions"] += ids.numel()
        mask = batch.get("attention_mask")
        seen["tokens"] += int(mask.sum()) if mask is not None else ids.numel()
        return batch

    trainer.data_collator = counted
    return seen


if __name__ == "__main__":
    import fire

    fire.Fire(main)
