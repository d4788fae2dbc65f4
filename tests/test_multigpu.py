"""Data-parallel training on the standard launcher: two gloo ranks on the CPU stand in for two GPUs."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT, SAMPLE, TINY, metrics

pytestmark = pytest.mark.slow


def test_torchrun_two_ranks_make_one_complete_run(tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           str(ROOT / "train_unsloth.py"), "--model_name", TINY, "--dataset", SAMPLE, "--max_steps", "6",
           "--save_steps", "3", "--output_dir", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    rec = json.loads((out / "run.json").read_text())
    assert rec["status"] == "finished" and rec["world_size"] == 2 and rec["metrics"]["global_step"] == 6
    lines = metrics(out)
    assert [m["step"] for m in lines] == [1, 2, 3, 4, 5, 6]  # one writer: rank 0
    # Each optimizer step consumed 2 ranks x 2 rows x 4 accumulation = 16 of the 231 rows.
    assert lines[-1]["epoch"] == pytest.approx(6 * 16 / 232, rel=0.02)
    assert "world size 2, effective batch 16 (2 per device x 4 accumulation x 2)" in done.stderr
    assert (out / "adapter_model.safetensors").is_file() and sorted(p.name for p in out.glob("checkpoint-*")) == [
        "checkpoint-3", "checkpoint-6"]
    assert not list(out.glob(".run.*"))  # no half-written records left by a second writer
