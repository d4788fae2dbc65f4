"""GPU memory and time, as the Unsloth notebook reports them (the per-step log is metricslog.py).

On a GPU the figures are torch's reserved/allocated bytes (what nvidia-smi roughly shows is reserved).
On a CPU they are the process's resident memory (RSS), and every record says so in `memory_kind`.
"""

import resource
import time

GB = 1024 ** 3


def _cuda():
    import torch

    return torch.cuda.is_available()


def snapshot() -> dict:
    """What the device holds now."""
    import psutil

    if _cuda():
        import torch

        idx = torch.cuda.current_device()
        props = torch.cuda.get_device_properties(idx)
        return {"device": torch.cuda.get_device_name(idx), "memory_kind": "gpu",
                "total_gb": round(props.total_memory / GB, 3),
                "reserved_gb": round(torch.cuda.memory_reserved(idx) / GB, 3),
                "allocated_gb": round(torch.cuda.memory_allocated(idx) / GB, 3),
                "peak_reserved_gb": round(torch.cuda.max_memory_reserved(idx) / GB, 3)}
    vm = psutil.virtual_memory()
    return {"device": "CPU", "memory_kind": "process RSS (no GPU)", "total_gb": round(vm.total / GB, 3),
            "available_gb": round(vm.available / GB, 3), "rss_gb": round(psutil.Process().memory_info().rss / GB, 3),
            "peak_rss_gb": round(peak_rss_bytes() / GB, 3)}


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def peak_gb() -> float:
    """Peak reserved GPU memory (or peak RSS on a CPU) of this process; the max over ranks under torchrun."""
    import torch

    value = torch.cuda.max_memory_reserved() / GB if _cuda() else peak_rss_bytes() / GB
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        t = torch.tensor([value], device="cuda" if _cuda() else "cpu")
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        value = float(t.item())
    return round(value, 3)


class Meter:
    """Start after the model is loaded (the notebook's `start_gpu_memory`), finish after training."""

    def start(self):
        self.start_gb = peak_gb()
        self.t0 = time.perf_counter()
        self.before = snapshot()
        return self

    def finish(self, train_seconds: float | None = None, tokens: int | None = None) -> dict:
        wall = time.perf_counter() - self.t0
        seconds = float(train_seconds if train_seconds is not None else wall)
        peak = peak_gb()
        total = self.before["total_gb"]
        fig = {
            "device": self.before["device"], "memory_kind": self.before["memory_kind"], "total_gb": total,
            "train_seconds": round(seconds, 2), "train_minutes": round(seconds / 60, 2),
            "start_reserved_gb": self.start_gb, "peak_reserved_gb": peak,
            "peak_reserved_for_training_gb": round(peak - self.start_gb, 3),
            "peak_reserved_pct": round(100 * peak / total, 3) if total else None,
            "training_pct": round(100 * (peak - self.start_gb) / total, 3) if total else None,
        }
        if self.before["memory_kind"] == "gpu":
            import torch

            fig["peak_allocated_gb"] = round(torch.cuda.max_memory_allocated() / GB, 3)
        if tokens:
            fig["tokens"] = int(tokens)
            fig["tokens_per_second"] = round(tokens / seconds, 1) if seconds else None
        return fig


def format_report(fig: dict) -> str:
    """The notebook's six lines, labelled honestly on a CPU."""
    what = "reserved memory" if fig["memory_kind"] == "gpu" else "process memory (RSS, no GPU)"
    lines = [
        f"{fig['train_seconds']} seconds used for training.",
        f"{fig['train_minutes']} minutes used for training.",
        f"Peak {what} = {fig['peak_reserved_gb']} GB.",
        f"Peak {what} for training = {fig['peak_reserved_for_training_gb']} GB.",
        f"Peak {what} % of max memory = {fig['peak_reserved_pct']} %.",
        f"Peak {what} for training % of max memory = {fig['training_pct']} %.",
    ]
    if fig.get("tokens_per_second"):
        lines.append(f"{fig['tokens_per_second']} tokens/s ({fig['tokens']} tokens) on {fig['device']}.")
    return "\n".join(lines)


def memory_now() -> dict:
    if _cuda():
        import torch

        return {"memory_kind": "gpu", "reserved_gb": round(torch.cuda.memory_reserved() / GB, 3),
                "allocated_gb": round(torch.cuda.memory_allocated() / GB, 3)}
    import psutil

    return {"memory_kind": "process RSS (no GPU)", "rss_gb": round(psutil.Process().memory_info().rss / GB, 3)}
