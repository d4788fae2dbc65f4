"""Ctrl-C / SIGTERM mid-training: a checkpoint and the adapter are saved, and --resume reaches the same end."""

import json
import signal
import subprocess
import time

import pytest

from conftest import SAMPLE, TINY, metrics, train_cmd

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_saves_and_resume_finishes(tmp_path, sig):
    out = tmp_path / "run"
    args = ["--model_name", TINY, "--dataset", SAMPLE, "--max_steps", "150", "--save_steps", "0",
            "--learning_rate", "1e-2", "--output_dir", str(out)]
    proc = subprocess.Popen(train_cmd(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline:  # wait until training is really under way
        if (out / "metrics.jsonl").exists() and len((out / "metrics.jsonl").read_text().splitlines()) >= 5:
            break
        time.sleep(0.05)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 128 + sig, stderr[-3000:]  # saved, but not done: 130 / 143 as a shell reports them
    rec = json.loads((out / "run.json").read_text())
    stopped = rec["metrics"]["global_step"]
    assert rec["status"] == "interrupted" and 5 <= stopped < 150
    m = rec["metrics"]  # rates of the steps trained (transformers' count 150 steps however many ran)
    assert m["train_steps_per_second"] == pytest.approx(stopped / m["train_runtime"], rel=0.01)
    assert m["train_samples_per_second"] == pytest.approx(8 * stopped / m["train_runtime"], rel=0.01)
    assert (out / f"checkpoint-{stopped}").is_dir() and (out / "adapter_model.safetensors").is_file()
    assert "received" in stderr and f"stopped: {sig.name} at step {stopped}; the checkpoint is saved" in stderr
    assert "--resume" in stderr and "Traceback" not in stderr

    # Only the folder and --resume typed: every other argument, the 150 steps included, comes from run.json.
    done = subprocess.run(train_cmd("--output_dir", str(out), "--resume"), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rec = json.loads((out / "run.json").read_text())
    assert rec["status"] == "finished" and rec["metrics"]["global_step"] == 150
    assert "had no length" not in done.stderr  # accelerate's line per logged step after a resume: dropped
    assert rec["resumed_from"].endswith(f"checkpoint-{stopped}")
    m = rec["metrics"]  # this session's steps: from the checkpoint to 150
    assert m["train_steps_per_second"] == pytest.approx((150 - stopped) / m["train_runtime"], rel=0.01)
    steps = [m["step"] for m in metrics(out)]
    assert steps == list(range(1, 151))  # every step once: nothing lost, nothing repeated
    losses = [m["loss"] for m in metrics(out)]  # the whole run's mean (transformers' divides one session's sum)
    assert rec["metrics"]["train_loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-3)
