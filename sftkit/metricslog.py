"""metrics.jsonl: one JSON line per logging step (loss, learning rate, step time, tokens, memory), rank 0 only."""

import json
import os
import time
from pathlib import Path

from .checkpoints import step_of
from .memory import memory_now


def metrics_callback(path):
    """A TrainerCallback that appends one line per logging step to `path`. A resumed run first drops the lines
    past its checkpoint (steps a kill cut off, which it trains again), so no step appears twice."""
    from transformers import TrainerCallback

    class MetricsCallback(TrainerCallback):
        def __init__(self):
            self.path = Path(path)
            self.last = None  # (time, step) of the previous log line, for seconds per step

        def on_train_begin(self, args, state, control, **kwargs):
            if state.is_world_process_zero and self.path.is_file():
                keep_through(self.path, state.global_step)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs or "train_loss" in logs:  # the summary is no step
                return
            now = time.perf_counter()
            step_time = None
            if self.last and state.global_step > self.last[1]:
                step_time = (now - self.last[0]) / (state.global_step - self.last[1])
            self.last = (now, state.global_step)
            line = {"step": state.global_step, "epoch": logs.get("epoch"), "loss": logs.get("loss"),
                    "learning_rate": logs.get("learning_rate"), "step_time": step_time,
                    "tokens_seen": state.num_input_tokens_seen or logs.get("num_tokens")}
            if "eval_loss" in logs:
                line["eval_loss"] = logs["eval_loss"]
            line.update(memory_now())
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(line) + "\n")

    return MetricsCallback()


def keep_through(path: Path, step: int):
    """Rewrites metrics.jsonl without the lines after `step` (atomically; a torn last line goes too)."""
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:
            continue
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(x + "\n" for x in kept), encoding="utf-8")
    os.replace(tmp, path)


def run_mean_loss(log_history) -> float | None:
    """The mean training loss over the run's logged steps, each interval weighted by its steps (exact at
    --logging_steps 1; a last interval never logged is left out). For a resumed run: transformers' own train_loss
    divides one session's loss sum by all the run's steps, so after --resume it read far too low (2.18 against
    logged losses of 7.65)."""
    prev = total = steps = 0
    for h in log_history:
        if "loss" in h and h.get("step", 0) > prev:
            total, steps, prev = total + h["loss"] * (h["step"] - prev), steps + h["step"] - prev, h["step"]
    return round(total / steps, 4) if steps else None


def session_rates(trainer, record, metrics: dict) -> dict:
    """Steps and samples per second of the steps this session trained. transformers divides max_steps by the
    runtime, so a run stopped at step 8 of 200 read 23.7 steps/s for 0.95, and a resumed one counted the steps
    before its checkpoint too."""
    runtime = metrics.get("train_runtime")
    start = step_of(Path(record.resumed_from)) if record.resumed_from else 0
    done = trainer.state.global_step - start
    if not runtime or done < 0:
        return {}
    a = trainer.args
    per_step = a.per_device_train_batch_size * a.gradient_accumulation_steps * max(a.world_size, 1)
    return {"train_steps_per_second": round(done / runtime, 3),
            "train_samples_per_second": round(done * per_step / runtime, 3)}
