"""Step-by-step timeline of consecutive trainers in one process: why is the first trainer slower?

    python benchmarks/step_timeline.py --model_dir .bench-cache/llama-3.1-8b --trainers 2x4,2x4 --cudnn_attention

Loads the model once, then runs one SFTTrainer per config in `trainers`, one after the other, on the same
synthetic Korean-length rows. For every optimizer step it records wall time, non-padding tokens, the CUDA
caching allocator's device allocations/frees/retries, torch.compile frames and graphs, and the time spent in
Python's garbage collector; one chosen step of each trainer runs under cProfile (top functions written as
text). Comparing the same step of the first and the second trainer shows what the first one pays for.
"""

import cProfile
import gc
import io
import json
import pstats
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))


def main(model_dir: str, trainers: str = "2x4,2x4", steps: int = 10, profile_step: int = 6, backend: str = "auto",
         extra: str = "", out: str = "/tmp/sftkit-bench/timeline", cudnn_attention: bool = False):
    """Run the trainers in turn and write timeline.json plus one cProfile text per trainer under `out`.

    Args:
      model_dir: model folder (benchmarks/shapes.py builds one).
      trainers: comma-separated micro-batch x accumulation configs, run in this order in one process.
      steps: optimizer steps per trainer.
      profile_step: the step (1-based) run under cProfile in each trainer; 0 for none.
      backend: auto | unsloth | hf.
      extra: JSON of further SFTConfig fields for configs marked with a '+' (e.g. 2x4+).
      out: output folder.
      cudnn_attention: allow cuDNN attention (the setting under which the first trainer was found slow).
    """
    from sftkit import estimate
    from sftkit.backend import add_lora, choose, load_model  # unsloth first, when chosen

    import torch
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from shapes import parse_config, prepared_rows
    from sftkit.cli import names as listed

    outdir = Path(out)
    outdir.mkdir(parents=True, exist_ok=True)
    gc_time = [0.0, None]

    def on_gc(phase, info):  # total seconds spent in collections
        if phase == "start":
            gc_time[1] = time.perf_counter()
        elif gc_time[1] is not None:
            gc_time[0] += time.perf_counter() - gc_time[1]

    gc.callbacks.append(on_gc)

    def counters():
        st = torch.cuda.memory_stats() if cuda else {}
        try:
            from torch._dynamo.utils import counters as dyn
            frames, graphs = sum(dyn["frames"].values()), dyn["stats"].get("unique_graphs", 0)
        except Exception:  # dynamo unavailable: report zeros rather than fail the timeline
            frames, graphs = 0, 0
        return {"device_allocs": st.get("num_device_alloc", 0), "device_frees": st.get("num_device_free", 0),
                "alloc_retries": st.get("num_alloc_retries", 0), "dynamo_frames": frames,
                "dynamo_graphs": graphs, "gc_s": gc_time[0]}

    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)  # CPU dry run of the harness
    t_load = time.perf_counter()
    choice = choose(backend, "auto", cudnn_attention)
    model, tok, _ = load_model(model_dir, 2048, choice, load_in_4bit=True)
    model = add_lora(model, choice, 16, 16, 0.0, list(estimate.MODULES), True, 3407, True)
    rows = prepared_rows(Path("/tmp/sftkit-bench/timeline.jsonl"), 512, tok)
    load_s = time.perf_counter() - t_load

    class Timeline(TrainerCallback):
        def __init__(self, tag):
            self.tag, self.steps, self.prof = tag, [], None

        def on_step_begin(self, args, state, control, **kw):
            sync()
            self.c0, self.tok0 = counters(), state.num_input_tokens_seen
            if state.global_step + 1 == profile_step:
                self.prof = cProfile.Profile()
                self.prof.enable()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            sync()
            wall = time.perf_counter() - self.t0
            if self.prof is not None:
                self.prof.disable()
                for key in ("tottime", "cumulative"):
                    buf = io.StringIO()
                    pstats.Stats(self.prof, stream=buf).sort_stats(key).print_stats(35)
                    (outdir / f"cprofile-{self.tag}-{key}.txt").write_text(buf.getvalue())
                self.prof = None
            c1 = counters()
            row = {"step": state.global_step, "wall_s": round(wall, 3),
                   "tokens": int(state.num_input_tokens_seen - self.tok0)}
            row.update({k: round(c1[k] - self.c0[k], 3) for k in c1})
            self.steps.append(row)
            print(self.tag, json.dumps(row), flush=True)

    report = {"model_dir": str(model_dir), "backend": choice.backend, "load_s": round(load_s, 1),
              "cudnn_attention": cudnn_attention,
              "device": torch.cuda.get_device_name(0) if cuda else "cpu", "trainers": []}
    for i, cfg in enumerate(listed(trainers)):
        micro, accum, more = parse_config(cfg, extra)
        tag = f"{i}-{cfg.rstrip('+')}{'+' if more else ''}"
        cb = Timeline(tag)
        args = SFTConfig(output_dir=str(outdir / "trainer"), per_device_train_batch_size=micro,
                         gradient_accumulation_steps=accum, max_steps=steps, learning_rate=2e-4, optim="adamw_8bit",
                         warmup_steps=5, bf16=choice.dtype == "bf16", fp16=choice.dtype == "fp16", logging_steps=1,
                         report_to="none", save_strategy="no", gradient_checkpointing=False, max_length=2048,
                         dataset_num_proc=None, include_num_input_tokens_seen="non_padding", seed=3407, **more)
        t0 = time.perf_counter()
        trainer = SFTTrainer(model=model, processing_class=tok, train_dataset=rows, args=args, callbacks=[cb])
        init_s = time.perf_counter() - t0
        trainer.train()
        walls = [s["wall_s"] for s in cb.steps]
        later = cb.steps[len(cb.steps) // 2:]
        summary = {"tag": tag, "config": cfg, "extra": more, "init_s": round(init_s, 1),
                   "mean_step_s": round(sum(walls) / len(walls), 3),
                   "later_half_tokens_per_s": round(sum(s["tokens"] for s in later)
                                                    / sum(s["wall_s"] for s in later), 1),
                   "steps": cb.steps}
        report["trainers"].append(summary)
        print(json.dumps({k: v for k, v in summary.items() if k != "steps"}), flush=True)
        del trainer
    (outdir / "timeline.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    import fire

    fire.Fire(main)
