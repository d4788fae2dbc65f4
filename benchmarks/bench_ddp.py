"""Data-parallel scaling: tokens/s on 1 GPU vs N GPUs (torchrun), same per-device batch, one invocation.

    python benchmarks/bench_ddp.py --shape llama-3.2-1b --gpus 2

Both runs use train_unsloth.py unchanged: `python train_unsloth.py ...` and `torchrun --nproc_per_node N
train_unsloth.py ...`. Tokens are non-padding tokens summed over ranks; speed is taken after warm-up.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_train import steady  # noqa: E402
from shapes import ROOT, make_data, make_model  # noqa: E402


def main(shape: str = "llama-3.2-1b", gpus: int = 2, backend: str = "auto", steps: int = 12, warmup: int = 3,
         per_device_train_batch_size: int = 2, gradient_accumulation_steps: int = 4,
         cache: str = "/tmp/sftkit-bench", out: str = ""):
    """Train the same job on 1 GPU and on `gpus` GPUs; print tokens/s, the speed-up and peak memory.

    Args:
      shape: llama-3.1-8b | llama-3.2-1b.
      gpus: GPUs for the data-parallel run.
      backend: auto | unsloth | hf.
      steps: optimizer steps per run.
      warmup: steps left out of the speed figures.
      per_device_train_batch_size: micro-batch per GPU (the same in both runs).
      gradient_accumulation_steps: micro-batches per optimizer step.
      cache: folder for the generated model and data.
      out: JSON path (default benchmarks/results/ddp-<shape>.json).
    """
    cache = Path(cache)
    model_dir = make_model(shape, cache)
    data = make_data(cache / "data-325.jsonl", 2048, 325)
    results = []
    for n in (1, gpus):
        run_dir = cache / f"ddp-{n}"
        launch = [sys.executable] if n == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                  "--nproc_per_node", str(n)]
        cmd = [*launch, str(ROOT / "train_unsloth.py"), "--model_name", str(model_dir), "--dataset", str(data),
               "--backend", backend, "--max_steps", str(steps), "--save_steps", "0", "--overwrite", "--sample_prompts", "none",
               "--per_device_train_batch_size", str(per_device_train_batch_size),
               "--gradient_accumulation_steps", str(gradient_accumulation_steps), "--output_dir", str(run_dir)]
        log = cache / f"ddp-{n}.log"
        t0 = time.time()
        with open(log, "w") as f:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT).returncode
        r = {"gpus": n, "rc": rc, "wall_s": round(time.time() - t0, 1)}
        if rc == 0 and (run_dir / "run.json").exists():
            rec = json.loads((run_dir / "run.json").read_text())
            r.update(world_size=rec["world_size"], backend=rec["backend"]["backend"],
                     peak_reserved_gb_max_over_ranks=rec["memory"]["peak_reserved_gb"],
                     device=rec["memory"]["device"])
            steady(r, run_dir / "metrics.jsonl", warmup)
        else:
            r["error"] = log.read_text(errors="replace")[-2500:]
        results.append(r)
        print(json.dumps(r)[:800], flush=True)
    ok = [r for r in results if "tokens_per_s" in r]
    if len(ok) == 2:
        print("| GPUs | tokens/s | s/step | peak reserved GB (max over ranks) |\n|---|---|---|---|")
        for r in ok:
            print(f"| {r['gpus']} | {r['tokens_per_s']} | {r['s_per_step']} | {r['peak_reserved_gb_max_over_ranks']} |")
        print(f"speed-up {ok[1]['tokens_per_s'] / ok[0]['tokens_per_s']:.2f}x on {gpus} GPUs")
    path = Path(out) if out else HERE / "results" / f"ddp-{shape}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "shape": shape, "results": results}, indent=2))


if __name__ == "__main__":
    import fire

    fire.Fire(main)
