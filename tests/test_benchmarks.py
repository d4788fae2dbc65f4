"""The decode benchmark's harness, dry-run on the tiny model on a CPU (speeds there mean nothing; the
bookkeeping is what is checked: one result per variant and round, ratios to the chosen baseline)."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_bench_infer_records_every_variant_and_its_ratio(tmp_path):
    out = tmp_path / "infer.json"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_infer.py"), "--shape", "tiny",
                          "--backends", "hf-served,hf-merged", "--baseline", "hf-served", "--new_tokens", "4",
                          "--batch", "2", "--repeats", "1", "--cache", str(tmp_path), "--out", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    rec = json.loads(out.read_text())
    by = {r["variant"]: r for r in rec["results"]}
    assert set(by) == {"hf-served", "hf-merged"} and not any("error" in r for r in rec["results"])
    assert by["hf-merged"]["merge_s"] is not None and by["hf-served"]["merge_s"] is None
    (ratio,) = rec["ratios"]
    assert ratio["variant"] == "hf-merged" and ratio["baseline"] == "hf-served"
    assert ratio["bs1"] == pytest.approx(by["hf-merged"]["bs1_tokens_per_s"] / by["hf-served"]["bs1_tokens_per_s"],
                                         rel=1e-2)
    assert "| 0 | hf-merged |" in res.stdout
    import torch

    host = rec["host"]  # launch-bound speeds depend on the host: it is recorded beside them
    assert host["cpu"] and host["cores"] >= 1 and (host["us_per_cuda_op"] is None) != torch.cuda.is_available()
    bad = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_infer.py"), "--shape", "tiny",
                          "--backends", "hf,nope", "--cache", str(tmp_path)], capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode != 0 and "unknown variant(s) ['nope']" in bad.stderr
