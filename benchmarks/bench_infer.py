"""Decode speed: Unsloth's for_inference vs plain transformers generate, same model, prompts and adapter.

    python benchmarks/bench_infer.py --shape llama-3.1-8b

Each backend runs in its own process. Both load the model in 4-bit with a fresh r=16 LoRA adapter on the
7 notebook modules (what infer.py serves), warm up once, then time greedy decoding of exactly
--new_tokens tokens (EOS ignored) at batch 1 and for a batch of --batch prompts. Prints a table, writes JSON.
"""

import contextlib
import getpass
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

# Named variants: (backend, cuDNN attention allowed, adapter, extra generate arguments). "hf" is plain
# transformers with the libraries' defaults; "unsloth" and "hf-sftkit" are what infer.py runs (cuDNN attention
# off, see sftkit/backend.py). Adapter "lora" is put on as for training (sftkit add_lora: Unsloth's get_peft_model,
# or on hf peft's prepare_model_for_kbit_training, which also turns the embeddings, norms and lm_head to
# float32); "served" as infer.py puts a saved adapter on (a plain peft wrapper, nothing else changed); "merged"
# is then folded into the 4-bit weights (infer.py --merge_adapter); "none" decodes the bare base model.
# "hf-static" asks for transformers' static KV cache (its generate compiles the decode step into CUDA graphs
# where the model allows; Unsloth's generate forces a dynamic cache), which transformers refuses for bitsandbytes
# 4-bit; "compiled" lets it (sftkit.generate.compiled_decoding).
VARIANTS = {"unsloth": ("unsloth", False, "lora", {}), "unsloth-cudnn": ("unsloth", True, "lora", {}),
            "hf": ("hf", True, "lora", {}), "hf-sftkit": ("hf", False, "lora", {}),
            "unsloth-served": ("unsloth", False, "served", {}), "hf-served": ("hf", True, "served", {}),
            "unsloth-merged": ("unsloth", False, "merged", {}), "hf-merged": ("hf", True, "merged", {}),
            "unsloth-base": ("unsloth", False, "none", {}), "hf-base": ("hf", True, "none", {}),
            "hf-static": ("hf", True, "lora", {"cache_implementation": "static"}),
            "hf-graphs": ("hf", True, "served", {"compiled": "inductor"}),
            "hf-cudagraphs": ("hf", True, "served", {"compiled": "cudagraphs"}),
            "hf-merged-graphs": ("hf", True, "merged", {"compiled": "inductor"}),
            "hf-merged-cudagraphs": ("hf", True, "merged", {"compiled": "cudagraphs"})}


def decode_profile(model, enc, tokens: int, pad_token_id: int, extra: dict) -> dict:
    """One bs1 generate of `tokens` tokens under torch.profiler: per generated token, the wall and CPU time, the
    GPU kernel time, kernel launches and host-device syncs, and the ops that took the most CPU."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from shapes import profiler_counts

    gen = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=pad_token_id, **extra)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof, torch.inference_mode():
        t0, c0 = time.perf_counter(), time.process_time()
        model.generate(**enc, **gen)
        torch.cuda.synchronize()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    gpu_us, launches, syncs = profiler_counts(prof.events())
    top = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:10]
    return {"tokens": tokens, "wall_ms_per_token": round(1e3 * wall / tokens, 2),
            "cpu_ms_per_token": round(1e3 * cpu / tokens, 2),  # process CPU time (profiler overhead included)
            "gpu_kernel_ms_per_token": round(gpu_us / 1e3 / tokens, 2),
            "gpu_busy_pct": round(100 * gpu_us / 1e6 / wall, 1), "launches_per_token": round(launches / tokens, 1),
            "syncs_per_token": round(syncs / tokens, 1),
            "top_cpu_ops": [[e.key[:50], round(e.self_cpu_time_total / 1e3 / tokens, 2), round(e.count / tokens, 1)]
                            for e in top]}


def worker(model_dir: str, variant: str, new_tokens: int, batch: int, repeats: int, out: str,
           profile_tokens: int = 0, dtype: str = "auto"):
    from sftkit import estimate
    from sftkit.backend import add_lora, choose, for_inference, load_model  # unsloth first, when chosen
    from sftkit.batchfile import batch_cache_len

    import torch

    backend, cudnn, adapter, extra = VARIANTS[variant]
    extra = dict(extra)
    # A compiled variant's first call depends on whether torch's inductor cache (kept in /tmp across processes
    # on one machine) already holds its kernels: 62.8 s cold against 23.6 s warm for the 8B shape.
    inductor = Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR") or f"/tmp/torchinductor_{getpass.getuser()}")
    inductor_cache_warm = inductor.is_dir() and any(inductor.iterdir())
    choice = choose(backend, dtype, cudnn)
    model, tok, _ = load_model(model_dir, 2048, choice, load_in_4bit=True)
    merge_s = None
    if adapter == "lora":
        model = add_lora(model, choice, 16, 16, 0.0, list(estimate.MODULES), True, 3407, True)
    elif adapter in ("served", "merged"):
        # A plain peft wrapper, as PeftModel.from_pretrained puts a saved adapter on in infer.py (not Unsloth's
        # get_peft_model, whose patched layer forwards expect the LoRA modules to stay after a merge). The merge
        # does the same work whatever the adapter holds.
        from peft import LoraConfig, get_peft_model

        from sftkit.backend import merge_adapter

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, target_modules=list(estimate.MODULES)))
        if adapter == "merged":
            t0 = time.perf_counter()
            model = merge_adapter(model)
            merge_s = round(time.perf_counter() - t0, 1)
    model = for_inference(model, choice)
    if "compiled" in extra:
        from sftkit.generate import GRAPH_CACHE, compiled_decoding

        mode = extra.pop("compiled")
        # As infer.py --cuda_graphs: one prompt at a time (a chat) starts with the cache it keeps for later
        # prompts; a batch file sizes it to its prompts (32 rows of 2048 tokens would be 8.6 GB of KV for 8B).
        extra.update(compiled_decoding(model, mode, max_cache_len=GRAPH_CACHE))
    rows = [json.loads(x) for x in (HERE.parent / "examples/data/korean_safe_sample.jsonl").read_text().splitlines()]
    prompts = [f"### 지시문:\n{r['instruction']}\n\n### 응답:\n" for r in rows[:batch]]
    tok.padding_side = "left"
    gen = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)

    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)  # CPU: a dry run of the harness (shape tiny)

    def timed(texts):
        enc = tok(texts, return_tensors="pt", padding=True).to(model.device)
        sync()
        t0 = time.perf_counter()
        kw = extra
        if len(texts) > 1 and "max_cache_len" in kw:  # a batch sizes the cache as infer.py's batch mode does
            kw = {**kw, "max_cache_len": batch_cache_len(enc["input_ids"].shape[1], new_tokens)}
            # transformers keeps the longest static cache any earlier call asked for (bs1's 2048 tokens: 8.6 GB of
            # KV at bs32, out of memory under the T4 cap), which a batch file run by infer.py never had
            for m in model.modules():
                m.__dict__.pop("_previous_max_cache_length", None)
        with torch.inference_mode():
            outp = model.generate(**enc, **gen, **kw)
        sync()
        produced = (outp.shape[1] - enc["input_ids"].shape[1]) * len(texts)
        return produced, time.perf_counter() - t0

    # Each batch size is warmed up right before it is timed: kernels (and, compiled, graphs) built, caches allocated.
    # A compiled decode step is specialised to its batch size and cache length, so switching sizes recompiles.
    first = [timed(prompts[:1])[1]]
    single = [timed(prompts[:1]) for _ in range(repeats)]
    partial = {"variant": variant, "bs1_tokens_per_s": round(sum(n for n, _ in single) / sum(t for _, t in single), 1),
               "bs1_each": [round(n / t, 1) for n, t in single], "first_bs1_s": round(first[0], 1)}
    print(json.dumps(partial), flush=True)  # kept in the log if the batch measurement fails (e.g. out of memory)
    res = {**partial, "backend": choice.backend, "device": torch.cuda.get_device_name(0) if cuda else "cpu",
           "merge_s": merge_s, "inductor_cache_warm": inductor_cache_warm}
    if batch > 1:  # at --batch 1 the batch measurement would only repeat (and overwrite) the batch-1 one
        first.append(timed(prompts)[1])
        many = [timed(prompts) for _ in range(repeats)]
        res.update({f"bs{batch}_tokens_per_s": round(sum(n for n, _ in many) / sum(t for _, t in many), 1),
                    f"first_bs{batch}_s": round(first[1], 1)})
    res["peak_reserved_gb"] = round(torch.cuda.max_memory_reserved() / 2**30, 3) if cuda else None
    if profile_tokens and cuda:
        res["profile_bs1"] = decode_profile(model, tok(prompts[:1], return_tensors="pt").to(model.device),
                                            profile_tokens, tok.pad_token_id, extra)
    Path(out).write_text(json.dumps(res))
    print(json.dumps(res))


def main(shape: str = "llama-3.1-8b", backends: str = "unsloth,hf", new_tokens: int = 128, batch: int = 32,
         repeats: int = 3, rounds: int = 1, profile_tokens: int = 0, cache: str = "/tmp/sftkit-bench",
         out: str = "", worker_timeout: int = 900, baseline: str = "hf", dtype: str = "auto"):
    """Benchmark decoding and write JSON.

    Args:
      shape: llama-3.1-8b | llama-3.2-1b (random weights, built once under cache) | tiny (CPU dry run).
      backends: comma-separated variants to compare (see VARIANTS; hf is plain transformers).
      new_tokens: tokens generated per prompt.
      batch: prompts in the batched measurement.
      repeats: timed repetitions of each measurement within a process.
      rounds: times the whole list of variants is run, interleaved (A B A B ...), to show the spread.
      profile_tokens: if > 0, also profile one batch-1 generate of this many tokens (GPU only).
      cache: folder of the generated model.
      out: JSON path (default benchmarks/results/infer-<shape>.json).
      worker_timeout: seconds after which one variant's process is stopped and recorded as an error.
      baseline: the variant every other one is divided by, within its round (hf-served: the plain recipe's
        inference of a saved adapter).
      dtype: compute dtype: auto | fp16 (what a T4 decodes in; for the rehearsal under ../shared/gpu/t4.sh) | bf16.
    """
    from shapes import host_info, make_model
    from sftkit.cli import names as listed

    model_dir = make_model(shape, Path(cache))
    host = host_info()  # batch-1 decoding is bound by launching kernels: the host sets its pace
    print(f"host: {host}", flush=True)
    names = listed(backends)
    unknown = [b for b in names + [baseline] if b not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    results = []
    for rnd in range(rounds):
        for b in names:
            tmp = Path(cache) / f"infer-{b}.json"
            tmp.unlink(missing_ok=True)
            cmd = [sys.executable, __file__, "worker", str(model_dir), b, str(new_tokens), str(batch), str(repeats),
                   str(tmp), str(profile_tokens), dtype]
            log = Path(cache) / f"infer-{b}.log"
            with open(log, "w") as f:
                try:  # a variant that hangs (e.g. compiling) must not take the others' results with it
                    rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=worker_timeout).returncode
                except subprocess.TimeoutExpired:
                    rc = f"timed out after {worker_timeout} s"
            text = log.read_text(errors="replace")
            partial = []  # the batch-1 line a worker printed before failing; one cut off mid-line is skipped
            for line in text.splitlines():
                if line.startswith('{"variant"'):
                    with contextlib.suppress(ValueError):
                        partial.append(json.loads(line))
            results.append({**(json.loads(tmp.read_text()) if tmp.exists() else
                                {**(partial[-1] if partial else {"variant": b}), "rc": rc, "error": text[-1500:]}),
                            "round": rnd})
            print(json.dumps(results[-1])[:600], flush=True)
    key = f"bs{batch}_tokens_per_s"
    ok = [r for r in results if "bs1_tokens_per_s" in r]  # a batch that failed keeps its batch-1 figures
    base = {r["round"]: r for r in ok if r["variant"] == baseline}
    ratios = []  # each variant / the baseline within a round: the pairs that shared the machine's state most closely
    for r in ok:
        if r["variant"] != baseline and r["round"] in base:
            b = base[r["round"]]
            ratios.append({"round": r["round"], "variant": r["variant"], "baseline": baseline,
                           "bs1": round(r["bs1_tokens_per_s"] / b["bs1_tokens_per_s"], 3)})
            if batch > 1:
                ratios[-1][f"bs{batch}"] = round(r[key] / b[key], 3) if key in r and key in b else None
    print(f"| round | variant | bs1 tokens/s | bs1 / {baseline} | {key} | batch/bs1 | peak reserved GB |\n"
          "|---|---|---|---|---|---|---|")
    for r in ok:
        vs = (f"{r['bs1_tokens_per_s'] / base[r['round']]['bs1_tokens_per_s']:.2f}x" if r["round"] in base
              else "-")
        many = (f"{r[key]} | {r[key] / r['bs1_tokens_per_s']:.1f}x" if batch > 1 and key in r else
                "- | -" if batch == 1 else "failed (see error) | -")
        print(f"| {r['round']} | {r['variant']} | {r['bs1_tokens_per_s']} | {vs} | {many} | "
              f"{r.get('peak_reserved_gb')} |")
    for x in ratios:
        many = x.get(f"bs{batch}") if batch > 1 else None
        print(f"round {x['round']}: {x['variant']} / {baseline} at bs1 {x['bs1']:.2f}x"
              + (f", at bs{batch} {f'{many:.2f}x' if many else '-'}" if batch > 1 else ""))
    for name in names:
        bs1 = sorted(x["bs1"] for x in ratios if x["variant"] == name)
        if len(bs1) > 1:
            print(f"{name} / {baseline} at bs1 over {len(bs1)} rounds: min {bs1[0]:.2f}x, "
                  f"median {statistics.median(bs1):.2f}x, max {bs1[-1]:.2f}x")
    path = Path(out) if out else HERE / "results" / f"infer-{shape}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "shape": shape, "new_tokens": new_tokens,
                                "batch": batch, "dtype": dtype, "rounds": rounds, "host": host, "results": results,
                                "ratios": ratios},
                               indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    import fire

    fire.Fire({"main": main, "worker": worker} if len(sys.argv) > 1 and sys.argv[1] == "worker" else main)
