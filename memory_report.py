"""GPU memory and time: now, per run, plotted, compared, and estimated before training.

    python memory_report.py                                  # this machine's GPU (or CPU RAM) right now
    python memory_report.py show outputs/RUN                 # the notebook's six figures for a finished run
    python memory_report.py plot outputs/RUN                 # loss and memory per step -> outputs/RUN/report.png
    python memory_report.py compare outputs/A outputs/B      # a markdown table, one row per run
    python memory_report.py estimate --model_name unsloth/Meta-Llama-3.1-8B --gpu t4   # will it fit?

Run folders are the ones train_unsloth.py writes (run.json + metrics.jsonl). Memory is in GB = 1024**3 bytes,
as in the Unsloth notebook. On a CPU the figures are the process's resident memory (RSS) and say so.
"""

import json
import sys
from pathlib import Path

from sftkit import estimate as est
from sftkit import memory, samples
from sftkit.advice import continue_or_restart
from sftkit.runfolder import RunFolder, RunRecord
from sftkit.cli import run_cli
from sftkit.doctor import doctor_cli
from sftkit.errors import UserError

METRICS = "metrics.jsonl"
PLOT = "report.png"


def now() -> dict:
    """Show the current device: GPU name, total, reserved and allocated memory; on a CPU, RAM and this process's RSS."""
    snap = memory.snapshot()
    if snap["memory_kind"] == "gpu":
        import torch

        free, total = torch.cuda.mem_get_info()  # device-wide, so other processes' memory shows here
        snap["free_on_device_gb"] = round(free / memory.GB, 3)
        lines = [f"GPU: {snap['device']}", f"total memory: {snap['total_gb']} GB",
                 f"free on the device (all processes): {snap['free_on_device_gb']} GB",
                 f"reserved by this process now: {snap['reserved_gb']} GB",
                 f"allocated by this process now: {snap['allocated_gb']} GB"]
    else:
        lines = ["CPU (no CUDA GPU visible): figures are system RAM and this process's resident memory (RSS)",
                 f"RAM total: {snap['total_gb']} GB", f"RAM available: {snap['available_gb']} GB",
                 f"process RSS now: {snap['rss_gb']} GB", f"process peak RSS: {snap['peak_rss_gb']} GB"]
    print("\n".join(lines))
    return snap


def finished_record(folder) -> RunRecord:
    """run.json of a run that got to the end (it has the memory figures), or a UserError saying how to finish it."""
    run = RunFolder(folder)
    record = run.read()
    if not isinstance(record.memory, dict):
        status = record.status
        why = f": {record.error}" if record.error else ""
        then = continue_or_restart(folder, bool(run.checkpoints(quiet=True)))  # what train_unsloth.py accepts
        how = f"Wait for it to end; if it was killed, {then}" if status == "running" else then[0].upper() + then[1:]
        raise UserError(f"run {str(folder)!r} did not finish (status {status!r}{why}), so run.json has no memory "
                        f"figures yet. {how}, then run this again.")
    return record


def show(run_dir: str = "") -> str:
    """Print the notebook's six figures (time, peak memory, shares of the card) plus tokens/s, device and loss.

    Args:
      run_dir: a run folder written by train_unsloth.py (holds run.json).
    """
    rec = finished_record(run_dir)
    fig, backend, metrics = rec.memory, rec.backend, rec.metrics or {}
    loss = metrics.get("final_loss")
    lines = [f"run: {run_dir} ({rec.status}, {metrics.get('global_step', '?')} steps)",
             f"device: {fig['device']}, backend: {backend.get('backend', '?')}, dtype: {backend.get('dtype', '?')}, "
             f"memory measured: {fig['memory_kind']}, total {fig['total_gb']} GB",
             memory.format_report(fig)]
    if rec.resumed_from:  # the trainer's runtime and token count restart with each session
        lines.insert(1, f"resumed from {Path(rec.resumed_from).name}: time, tokens and memory below are this "
                        "last session's, not the whole run's")
    if fig.get("peak_allocated_gb") is not None:  # GPU runs: what tensors used at most, inside the reserved peak
        lines.append(f"Peak allocated memory = {fig['peak_allocated_gb']} GB.")
    if not fig.get("tokens_per_second"):  # format_report prints tokens/s only when it was recorded
        lines.append("tokens/s: not recorded.")
    lines.append(f"final loss: {round(loss, 4) if loss is not None else 'not recorded'}"
                 + (f", eval loss: {round(metrics['eval_loss'], 4)}" if metrics.get("eval_loss") is not None else ""))
    lines += samples.summary(samples.last_samples(run_dir))  # the last answers sampled in training, if any
    text = "\n".join(lines)
    print(text)
    return text


def read_metrics(run_dir) -> list:
    """The per-step lines of RUN/metrics.jsonl, one per step (a resumed run keeps the later line of a step)."""
    path = Path(run_dir) / METRICS
    if not str(run_dir or "").strip() or not Path(run_dir).is_dir():
        RunFolder(run_dir).read()  # raises the clear "no folder given" or "folder does not exist" error
    if not path.is_file():
        raise UserError(f"{str(run_dir)!r} has no {METRICS}: the run logged no step yet, or the folder was not "
                        "written by train_unsloth.py. Train (or --resume) until at least one step is logged, "
                        "then plot again.")
    by_step = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"{path} line {n} is not valid JSON; the file is damaged. Delete that line (an "
                            "interrupted write leaves half a line at the end) and try again.") from None
        if "step" in row:
            by_step[row["step"]] = {**by_step.get(row["step"], {}), **row}  # eval lines merge into their step
    if not by_step:
        raise UserError(f"{path} is empty: no step was logged yet. Train until one is, then plot again.")
    return [by_step[s] for s in sorted(by_step)]


def plot(run_dir: str = "") -> str:
    """Draw loss and memory per step from RUN/metrics.jsonl into RUN/report.png; prints and returns the path.

    Args:
      run_dir: a run folder written by train_unsloth.py (holds metrics.jsonl).
    """
    rows = read_metrics(run_dir)
    import matplotlib

    matplotlib.use("Agg")  # files only: works on headless servers and in Colab alike
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (ax_loss, ax_mem) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    pairs = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]
    if pairs:
        ax_loss.plot(*zip(*pairs), label="train loss")
    evals = [(r["step"], r["eval_loss"]) for r in rows if r.get("eval_loss") is not None]
    if evals:
        ax_loss.plot(*zip(*evals), "o-", label="eval loss")
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    ax_loss.set_title(f"{Path(run_dir).resolve().name}: loss and memory per step")
    gpu = any(r.get("memory_kind") == "gpu" for r in rows)
    series = [("reserved_gb", "reserved"), ("allocated_gb", "allocated")] if gpu else [("rss_gb", "process RSS")]
    for key, label in series:
        points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        if points:
            ax_mem.plot(*zip(*points), label=label)
    ax_mem.set_ylabel("GPU memory (GB)" if gpu else "CPU process memory, RSS (GB)")
    ax_mem.set_xlabel("step")
    ax_mem.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    ax_mem.legend()
    fig.tight_layout()
    out = Path(run_dir) / PLOT
    try:
        fig.savefig(out, dpi=100)
    except OSError as err:  # a read-only or full run folder
        raise UserError(f"cannot write {out} ({err.strerror}). Copy the run folder somewhere writable and plot "
                        "there, or free space.") from err
    finally:
        plt.close(fig)
    print(out)
    return str(out)


def compare(*run_dirs: str) -> str:
    """Print a markdown table of finished runs: backend, device, time, tokens/s, peak memory, final loss.

    Args:
      run_dirs: two or more run folders written by train_unsloth.py (one works too).
    """
    if not run_dirs:
        raise UserError("compare needs run folders: python memory_report.py compare outputs/A outputs/B")
    rows = ["| run | backend | device | train seconds | tokens/s | peak memory GB | final loss |",
            "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for folder in run_dirs:
        rec = finished_record(folder)
        fig, loss = rec.memory, (rec.metrics or {}).get("final_loss")
        peak = f"{fig['peak_reserved_gb']}" + ("" if fig["memory_kind"] == "gpu" else " (RSS)")
        name = Path(str(folder)).resolve().name + (" (last session)" if rec.resumed_from else "")
        cells = [name, rec.backend.get("backend", "?"), fig["device"],
                 fig["train_seconds"], fig.get("tokens_per_second") or "-", peak,
                 round(loss, 4) if loss is not None else "-"]
        rows.append("| " + " | ".join(str(c) for c in cells) + " |")
    table = "\n".join(rows)
    print(table)
    return table


def _this_gpu():
    """GiB of this machine's GPU, or None without one (then the estimate is for a T4, the project's target)."""
    import torch

    if not torch.cuda.is_available():
        return None
    return round(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / memory.GB, 2)


def estimate(model_name: str = "unsloth/Meta-Llama-3.1-8B", max_seq_length: int = 2048,
             per_device_train_batch_size: int = 2, r: int = 16, gpu: str | float = "",
             target_modules: str = ",".join(est.MODULES), use_gradient_checkpointing: bool = True,
             optim: str = "adamw_8bit", train_embeddings: bool = False) -> dict:
    """Predict peak GPU memory of QLoRA training from the model config alone, and say whether it fits.

    Args:
      model_name: config source: a local config.json or model folder, a known name (unsloth/Meta-Llama-3.1-8B,
        meta-llama/Llama-3.2-1B, ...), or a model already in the local Hugging Face cache. No download.
      max_seq_length: tokens per row; the estimate assumes every row is this long (the worst case).
      per_device_train_batch_size: rows per micro-batch.
      r: LoRA rank.
      gpu: t4 | l4 | a100-40 | a100-80 | h100, or its memory as a number of GB; default: this GPU, else t4.
      target_modules: comma-separated linear layers that get LoRA.
      use_gradient_checkpointing: Unsloth's offloaded gradient checkpointing (as train_unsloth.py's flag).
      optim: optimizer, for the size of its states (adamw_8bit, adamw_torch, ...).
      train_embeddings: also train embed_tokens and lm_head in full (train_unsloth.py --train_embeddings).
    """
    cfg, source = est.load_config(str(model_name))
    here = _this_gpu() if gpu in ("", None) else None
    card = here if here else ("t4" if gpu in ("", None) else gpu)
    res = est.estimate(cfg, max_seq_length, per_device_train_batch_size, r, target_modules,
                       use_gradient_checkpointing, optim, card, train_embeddings)
    if here:
        label = f"this GPU ({card} GB)"
    elif str(card).strip().lower() in est.GPUS:
        label = f"{card} ({res['gpu_gib']} GB visible to torch)"
    else:
        label = f"a {res['gpu_gib']} GB GPU"
    gc = "offloaded gradient checkpointing" if use_gradient_checkpointing else "NO gradient checkpointing"
    parts = [
        ("4-bit base weights", res["base_4bit_gib"],
         f"{res['quantized_params'] / 1e9:.2f}B decoder linear params x {est.NF4_BYTES_PER_PARAM:.4f} B (NF4)"),
        ("16-bit embeddings, lm_head, norms", res["embeddings_16bit_gib"],
         f"{res['half_params'] / 1e9:.2f}B params x 2 B" + (" (tied)" if cfg["tie_word_embeddings"] else "")),
        ("LoRA weights, grads, optimizer", res["lora_gib"],
         f"{res['lora_params'] / 1e6:.1f}M params x {8 + est.OPTIMIZER_STATE_BYTES[optim]} B ({optim})"),
        ("activations", res["activations_gib"], f"{max_seq_length} x {per_device_train_batch_size} tokens, {gc}"),
        ("logits", res["logits_gib"], f"tokens x vocab {cfg['vocab_size']} x {est.LOGIT_BYTES} B"),
        ("runtime overhead", res["runtime_overhead_gib"], "CUDA context, workspaces, allocator slack"),
    ]
    if train_embeddings:
        parts.append(("trained embed_tokens + lm_head", res["train_embeddings_gib"],
                      f"copies in fp32 with grads and {optim} states (--train_embeddings)"))
    lines = [f"QLoRA memory estimate for {model_name} ({source}): seq {max_seq_length}, batch "
             f"{per_device_train_batch_size}, r {r} on {len(res['target_modules'])} modules", "",
             "| component | GB | from |", "| --- | ---: | --- |"]
    lines += [f"| {name} | {gib:.2f} | {how} |" for name, gib, how in parts]
    lines += [f"| **total (peak)** | **{res['total_gib']:.2f}** | |", ""]
    if res["fits"]:
        lines.append(f"fits on {label}: {res['headroom_gib']:.2f} GB headroom "
                     f"({100 * res['total_gib'] / res['gpu_gib']:.0f}% used).")
    else:
        lines.append(f"does NOT fit on {label}: {-res['headroom_gib']:.2f} GB short. Lower "
                     "--per_device_train_batch_size (raise --gradient_accumulation_steps to keep the effective "
                     "batch) or --max_seq_length, or use a larger GPU.")
    lines.append("Worst case (every row max_seq_length long). Activation, logit and overhead terms are fitted to "
                 "measured Unsloth runs (1B and 8B shapes, H100): within 10% there; see benchmarks/README.md.")
    print("\n".join(lines))
    return res


# run_cli drops what a command returns (Fire would print it again): each prints its own output.
COMMANDS = {"now": now, "show": show, "plot": plot, "compare": compare, "estimate": estimate, "doctor": doctor_cli}

if __name__ == "__main__":
    if len(sys.argv) == 1:
        sys.argv.append("now")  # no command: show the current device
    run_cli(COMMANDS)
