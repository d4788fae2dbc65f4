import sys

import pytest

from sftkit import doctor as d

UNSLOTH_REQUIRES = [  # the shape of unsloth 2026.10.7's Requires-Dist lines
    "torch<2.15.0,>=2.4.0",
    "transformers!=4.53.0,!=5.0.0,<=5.17.0,>=4.52.4",
    'trl!=0.19.0,<=1.15.0,>=0.18.2; sys_platform != "never"',
    'trl<0.1; extra == "old"',
    "xformers>=0.0.27.post2",
]


def test_unsloth_ranges_come_from_its_metadata_and_skip_extras():
    ranges = d.unsloth_ranges(UNSLOTH_REQUIRES)
    assert "<=5.17.0" in ranges["transformers"] and "!=5.0.0" in ranges["transformers"]
    assert "<0.1" not in ranges["trl"] and "<=1.15.0" in ranges["trl"]
    assert ranges["torch"] == "<2.15.0,>=2.4.0"
    assert d.unsloth_ranges(None) == d.FALLBACK_RANGES  # no unsloth installed: the pinned release's ranges


@pytest.mark.parametrize("version, gpu, status", [
    ("5.17.0", True, d.OK), ("5.18.0", True, d.FAIL), ("5.18.0", False, d.OK), ("5.0.0", True, d.FAIL),
    (None, False, d.FAIL), (None, True, d.FAIL)])
def test_transformers_outside_unsloths_range_fails_only_on_a_gpu(version, gpu, status):
    spec = d.unsloth_ranges(UNSLOTH_REQUIRES)["transformers"]
    verdict = d.version_verdict("transformers", version, spec, gpu)
    assert verdict.status == status
    if status == d.FAIL:
        assert "pip install -r requirements.txt" in verdict.text


def test_torch_newer_than_unsloth_supports_fails_on_a_gpu():
    verdict = d.version_verdict("torch", "2.15.0", "<2.15.0,>=2.4.0", gpu=True)
    assert verdict.status == d.FAIL and "2.15.0" in verdict.text


@pytest.mark.parametrize("built, torch_version, match", [
    ("2.10.0+cu128", "2.11.0+cu130", False),  # Colab's torch beside the xformers 0.0.35 wheel
    ("2.10.0+cu128", "2.10.0+cu130", False),  # same torch, other CUDA major
    ("2.10.0+cu128", "2.10.1+cu126", True),
    ("2.10.0+cu128", "2.10.0", True)])
def test_xformers_build_must_match_torch_and_cuda_major(built, torch_version, match):
    assert d.xformers_build_matches(built, torch_version) is match


@pytest.mark.parametrize("cap, flash, xformers, kernel", [
    ((7, 5), True, True, "xformers"),  # flash-attn needs compute capability 8.0
    ((8, 0), True, True, "flash-attn"),
    ((8, 9), False, True, "xformers"),
    ((9, 0), False, False, "SDPA")])
def test_attention_follows_unsloths_order(cap, flash, xformers, kernel):
    assert d.attention_choice(cap, flash, xformers)[0] == kernel


def test_sdpa_on_a_t4_says_it_is_slower():
    kernel, why = d.attention_choice((7, 5), False, False)
    assert kernel == "SDPA" and "slower" in why


def test_memory_verdict():
    assert d.memory_verdict(7.1, 14.5, 14.7).status == d.OK
    short = d.memory_verdict(7.1, 5.0, 14.7)
    assert short.status == d.FAIL and "another process" in short.text and "--max_seq_length" in short.text
    assert d.exit_code([d.Finding(d.OK, ""), d.Finding(d.WARN, "")]) == 0
    assert d.exit_code([d.Finding(d.OK, ""), short]) == 1


def test_where_detects_colab_and_kaggle(monkeypatch):
    for var in ("COLAB_RELEASE_TAG", "COLAB_GPU", "KAGGLE_KERNEL_RUN_TYPE", "KAGGLE_URL_BASE"):
        monkeypatch.delenv(var, raising=False)
    assert d.where() == "local"
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Interactive")
    assert d.where() == "Kaggle"
    monkeypatch.setenv("COLAB_RELEASE_TAG", "release-colab-20260801")
    assert d.where() == "Google Colab"


def test_doctor_on_this_cpu_is_ready_for_the_cpu_path(capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value")
    assert d.doctor() == 0
    out = capsys.readouterr().out
    assert "CPU path" in out and "dtype fp32" in out and "ready to train" in out and "attention: PyTorch SDPA" in out
    assert "needs a GPU" in out and "hf_secret_value" not in out and "HF_TOKEN is set" in out


def test_doctor_without_torch_fails(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
    assert d.doctor() == 1
    assert "torch does not import" in capsys.readouterr().out


def test_doctor_on_a_busy_t4_fails_on_memory(capsys, monkeypatch):
    """The GPU path's wiring, with the GPU and the probes faked: a T4 with 5 GB free cannot take the 8B job."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i=0: (5 * d.GB, int(14.7 * d.GB)))
    monkeypatch.setattr(d, "try_run", lambda fn: (True, ""))  # unsloth, bitsandbytes, xformers all work
    versions = {"unsloth": "2026.10.7", "xformers": "0.0.35", "bitsandbytes": "0.50.2", "flash-attn": None}
    real = d.installed
    monkeypatch.setattr(d, "installed", lambda name: versions[name] if name in versions else real(name))
    monkeypatch.setattr(d.metadata, "requires", lambda name: UNSLOTH_REQUIRES)
    assert d.doctor() == 1
    out = capsys.readouterr().out
    assert "dtype fp16" in out and "compute capability 7.5" in out
    assert "Unsloth will use xformers" in out
    assert "5.0 of 14.7 GB free" in out and "NOT ready" in out
