"""Training speed and memory: Unsloth vs the plain Hugging Face QLoRA recipe, side by side, one invocation.

    python benchmarks/bench_train.py --shape llama-3.1-8b                       # notebook config, both backends + fast
    python benchmarks/bench_train.py --shape llama-3.1-8b --memory_cap_gb 15    # T4 check: fits 16 GB? longest seq?
    python benchmarks/bench_train.py --shape tiny --backends hf --fast False    # CPU dry run of the harness

Each variant runs train_unsloth.py in its own process (so each backend imports what it needs, first) on a
random-init model of the named shape and synthetic rows whose lengths resemble the Korean data set. It
prints a markdown table with ratios and writes JSON. Tokens are non-padding tokens (TRL's count).
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
from sftkit.cli import names as listed  # noqa: E402  (comma-separated CLI values)
from shapes import ROOT, SHAPES, host_info, make_data, make_model, train_flops_per_token  # noqa: E402

PEAK_TFLOPS = {"H100": 989, "H200": 989, "A100": 312, "L4": 121, "T4": 65, "A10": 125}  # dense bf16/fp16 spec

CAP_WRAPPER = ("import sys, runpy, torch; cap = float(sys.argv.pop(1)); "
               "total = torch.cuda.get_device_properties(0).total_memory / 2**30; "
               "torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total)); "
               "sys.argv[0] = sys.argv[1]; del sys.argv[1]; runpy.run_path(sys.argv[0], run_name='__main__')")


# Named variants: backend and extra train_unsloth.py flags. "hf" is the plain recipe with the libraries'
# defaults, which leave PyTorch free to pick cuDNN attention; "hf-sftkit" is the same backend with this
# project's default (cuDNN attention off), to show how much of the gap that one setting is.
VARIANTS = {"unsloth": ("unsloth", []), "unsloth-cudnn": ("unsloth", ["--cudnn_attention"]),
            "hf": ("hf", ["--cudnn_attention"]), "hf-sftkit": ("hf", []), "unsloth-fast": ("unsloth", ["--fast"]),
            "unsloth-packing": ("unsloth", ["--packing"]), "unsloth-fast-packing": ("unsloth", ["--fast", "--packing"]),
            # What a T4 runs: no native bf16 there, so fp16 with loss scaling (train_unsloth's auto choice on a T4).
            "unsloth-fp16": ("unsloth", ["--dtype", "fp16"]),
            # Fast mode on the plain path (Unsloth missing on a GPU): its plan adds what that path holds more.
            "hf-fast": ("hf", ["--fast"]),
            # Fast mode with PyTorch's fused AdamW (fp32 states, one multi-tensor kernel) instead of bitsandbytes'
            # 8-bit AdamW (a kernel and Python call per LoRA matrix): how much of the step is the optimizer.
            "unsloth-fast-fused-adamw": ("unsloth", ["--fast", "--optim", "adamw_torch_fused"]),
            # The plan fast mode made for packed rows before it weighed checkpointing against micro-batch size.
            "unsloth-packing-8x1-ckpt": ("unsloth", ["--packing", "--per_device_train_batch_size", "8",
                                                     "--gradient_accumulation_steps", "1"])}


def peak_tflops(device: str) -> float | None:
    return next((v for k, v in PEAK_TFLOPS.items() if k in device), None)


def run_variant(name, model_dir, data, work, backend, steps, extra, cap_gb, log):
    out = work / f"run-{name}"
    cmd = [str(ROOT / "train_unsloth.py"), "--model_name", str(model_dir), "--dataset", str(data),
           "--backend", backend, "--max_steps", str(steps), "--save_steps", "0", "--output_dir", str(out),
           "--sample_prompts", "none",  # no answers sampled at the end: timings are training only
           "--overwrite", "--logging_steps", "1", *extra]
    cmd = [sys.executable, "-c", CAP_WRAPPER, str(cap_gb), *cmd] if cap_gb else [sys.executable, *cmd]
    t0 = time.time()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    result = {"variant": name, "backend": backend, "args": extra, "rc": rc, "wall_s": round(time.time() - t0, 1)}
    if rc != 0 or not (out / "run.json").exists():
        result["error"] = Path(log).read_text(errors="replace")[-1500:]
        return result
    rec = json.loads((out / "run.json").read_text())
    result.update(device=rec["memory"]["device"], dtype=rec["backend"]["dtype"], steps=rec["metrics"]["global_step"],
                  peak_reserved_gb=rec["memory"]["peak_reserved_gb"],
                  peak_allocated_gb=rec["memory"].get("peak_allocated_gb"),
                  train_seconds=rec["memory"]["train_seconds"], final_loss=rec["metrics"]["final_loss"],
                  micro_batch=(rec.get("fast") or rec["args"])["per_device_train_batch_size"],  # fast: the plan's
                  grad_accum=(rec.get("fast") or rec["args"])["gradient_accumulation_steps"], fast=rec.get("fast"))
    return result


def steady(result, metrics_path, warmup):
    """Tokens/s and s/step over the steps after warm-up (compilation and allocator growth excluded)."""
    lines = [json.loads(x) for x in Path(metrics_path).read_text().splitlines()]
    after = [m for m in lines if m["step"] > warmup and m["step_time"]]
    base = next(m for m in lines if m["step"] == warmup)
    secs = sum(m["step_time"] for m in after)
    tokens = after[-1]["tokens_seen"] - base["tokens_seen"]
    result.update(tokens_per_s=round(tokens / secs, 1), s_per_step=round(secs / len(after), 3),
                  tokens_per_step=round(tokens / len(after), 1))


def main(shape: str = "llama-3.1-8b", backends: str = "unsloth,hf,hf-sftkit", fast: bool = True, steps: int = 15,
         warmup: int = 3, rows: int = 512, mean_tokens: int = 325, memory_cap_gb: float = 0.0,
         seq_lens: str = "1024,2048,4096,8192,16384", search_dtype: str = "auto", cache: str = "/tmp/sftkit-bench",
         out: str = "", dtype: str = ""):
    """Run the benchmark and write JSON.

    Args:
      shape: llama-3.1-8b | llama-3.2-1b | tiny (the bundled model, for a CPU dry run).
      backends: comma-separated variants on the notebook config (see VARIANTS; hf is the plain recipe; NAME@N: N steps).
      fast: also run Unsloth's --fast mode at the same effective batch.
      steps: optimizer steps per variant.
      warmup: steps left out of the speed figures.
      rows: synthetic rows to generate.
      mean_tokens: mean row length in tokens (the Korean set's rows average about 325 with the template).
      memory_cap_gb: cap GPU memory per process (e.g. 15 for a 16 GB T4), then search the longest sequence.
      seq_lens: sequence lengths tried, in order, by the longest-sequence search under the cap ("" skips it).
      search_dtype: dtype of that search: auto (bf16 on an H100) | fp16 (what a T4 trains in) | bf16.
      cache: folder for the generated model and data (large: 16 GB for the 8B shape).
      out: JSON path (default benchmarks/results/train-<shape>[-capN].json).
      dtype: train every variant in this dtype (fp16 for the T4 rehearsal under ../shared/gpu/t4.sh); "" = auto.
    """
    import torch

    cache = Path(cache)
    t0 = time.time()
    model_dir = make_model(shape, cache)
    data = make_data(cache / f"data-{mean_tokens}.jsonl", rows, mean_tokens)
    print(f"model {model_dir} ready after {time.time() - t0:.0f}s", flush=True)
    config = SHAPES[shape] or json.loads((model_dir / "config.json").read_text())
    work = cache / "runs"
    work.mkdir(parents=True, exist_ok=True)
    unknown = [b for b in listed(backends) if b.split("@")[0] not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)} (NAME@STEPS sets its steps)")
    # NAME@STEPS runs that variant for STEPS steps (unsloth@60: the notebook job's 60 steps, timed whole); the
    # speed figures still come from the steps after warm-up, so they compare with the others'.
    variants = [(b, *VARIANTS[b.split("@")[0]], int(b.split("@")[1]) if "@" in b else steps) for b in listed(backends)]
    if fast:
        variants.append(("unsloth-fast", *VARIANTS["unsloth-fast"], steps))
    results = []
    report = {"date": time.strftime("%Y-%m-%d"), "shape": shape, "steps": steps, "warmup": warmup, "dtype": dtype,
              "mean_tokens": mean_tokens, "memory_cap_gb": memory_cap_gb, "results": results,
              "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU",
              "versions": __import__("sftkit.runrecord", fromlist=["x"]).library_versions(), "host": host_info()}
    print(f"host: {report['host']}", flush=True)
    path = Path(out) if out else HERE / "results" / f"train-{shape}{f'-cap{memory_cap_gb:g}' if memory_cap_gb else ''}.json"
    for name, backend, extra, n_steps in variants:
        print(f"running {name} ...", flush=True)
        extra = [*extra, "--dtype", dtype] if dtype and "--dtype" not in extra else extra
        r = run_variant(name, model_dir, data, work, backend, n_steps, extra, memory_cap_gb, work / f"{name}.log")
        if "error" not in r:
            steady(r, work / f"run-{name}" / "metrics.jsonl", warmup)
            tf = peak_tflops(r["device"])
            seq = r["tokens_per_step"] / (r["micro_batch"] * r["grad_accum"])
            r["mfu_pct"] = round(100 * r["tokens_per_s"] * train_flops_per_token(config, seq) / (tf * 1e12), 2) if tf else None
        results.append(r)
        print(json.dumps(r)[:600], flush=True)
        save(report, path)  # after every variant: a run cut short still leaves its numbers
    if memory_cap_gb and listed(seq_lens):
        report["seq_search"] = seq_search(model_dir, seq_lens, memory_cap_gb, work, search_dtype)
        save(report, path)
    print(table(results))
    print(f"wrote {path}")


def save(report, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))


def seq_search(model_dir, seq_lens, cap_gb, work, dtype="auto"):
    """Longest sequence that trains (batch 2) under the cap: one process, lengths tried in increasing order."""
    lens = ",".join(listed(seq_lens))
    cmd = [sys.executable, str(HERE / "seq_search.py"), "--model_dir", str(model_dir), "--seq_lens", lens,
           "--memory_cap_gb", str(cap_gb), "--dtype", dtype, "--out", str(work / "seq_search.json")]
    with open(work / "seq_search.log", "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    if not (work / "seq_search.json").exists():
        return {"rc": rc, "error": (work / "seq_search.log").read_text(errors="replace")[-1500:]}
    return json.loads((work / "seq_search.json").read_text())


def table(results) -> str:
    ok = [r for r in results if "error" not in r]
    ref = next((r for r in ok if r["variant"] == "hf"), None)
    head = ("| variant | micro-batch x accum | tokens/s | s/step | peak reserved GB | peak allocated GB | MFU % "
            "| tokens/s vs hf | reserved vs hf | steps, wall s (load to save) |\n|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for r in results:
        if "error" in r:
            rows.append(f"| {r['variant']} | failed (rc {r['rc']}) | | | | | | | | |")
            continue
        rs = f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x" if ref else ""
        rm = f"{r['peak_reserved_gb'] / ref['peak_reserved_gb']:.2f}x" if ref else ""
        rows.append(f"| {r['variant']} | {r['micro_batch']} x {r['grad_accum']} | {r['tokens_per_s']} | "
                    f"{r['s_per_step']} | {r['peak_reserved_gb']} | {r.get('peak_allocated_gb')} | "
                    f"{r.get('mfu_pct')} | {rs} | {rm} | {r['steps']}, {r['wall_s']} |")
    return head + "\n" + "\n".join(rows)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import fire

    fire.Fire(main)
