import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "examples" / "tiny-llama")
SAMPLE = str(ROOT / "examples" / "data" / "korean_safe_sample.jsonl")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the suite never touches the network
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# The T4 rehearsal (../shared/gpu/t4.sh) runs the GPU suite with SFTKIT_TEST_DTYPE=fp16: the H200 under MPS still
# reports bf16 support, and a T4 trains in fp16.
DTYPE = os.environ.get("SFTKIT_TEST_DTYPE", "auto")


def cuda_available():
    import torch

    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def quick_args(tmp_path, **over):
    """A fast CPU training run on the tiny model; learning rate high enough for the loss to move in 20 steps."""
    args = dict(model_name=TINY, dataset=SAMPLE, max_samples=16, max_steps=20, learning_rate=1e-2, warmup_steps=0,
                output_dir=str(tmp_path / "run"), save_steps=10, logging_steps=1)
    if DTYPE != "auto":
        args["dtype"] = DTYPE
    args.update(over)
    return args


def metrics(folder):
    return [json.loads(line) for line in (Path(folder) / "metrics.jsonl").read_text().splitlines()]


def write_jsonl(path, rows):
    Path(path).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One finished training run shared by the tests that only read it."""
    from train_unsloth import train

    return train(**quick_args(tmp_path_factory.mktemp("shared")))


@pytest.fixture
def no_model_load(monkeypatch):
    """Makes open_generator's model load fail: a test using it shows an argument is refused before the load."""
    import sftkit.generate

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the argument check")

    monkeypatch.setattr(sftkit.generate, "load_model", no_load)


def train_cmd(*args):
    dtype = ["--dtype", DTYPE] if DTYPE != "auto" and "--dtype" not in args and "--resume" not in args else []
    return [sys.executable, str(ROOT / "train_unsloth.py"), *args, *dtype]


def prepared(ds, template, eos_token, **kw):
    """Rows as the trainer gets them: read, checked and rendered (data.read_rows), then EOS added (data.add_eos)."""
    from sftkit import data

    rows, info = data.read_rows(ds, template, **kw)
    return data.add_eos(rows, eos_token), info


def _fixture_dir():
    """The real Llama 3.1 tokenizer (../shared/fixtures/llama-3.1-tokenizer; on the GPU machine a copy carried in
    .gpu/fixture, or LLAMA31_TOKENIZER). It stays out of the repo (license)."""
    for p in (os.environ.get("LLAMA31_TOKENIZER"), ROOT.parent / "shared" / "fixtures" / "llama-3.1-tokenizer",
              ROOT / ".gpu" / "fixture"):
        if p and (Path(p) / "tokenizer.json").is_file():
            return Path(p)
    return None


FIXTURE = _fixture_dir()
needs_fixture = pytest.mark.skipif(FIXTURE is None, reason="the real Llama 3.1 tokenizer fixture "
                                   "(../shared/fixtures/llama-3.1-tokenizer) is absent; it is kept out of the repo")
FLAVOURS = ("base-meta", "base-unsloth", "instruct-meta")


def real_tokenizer_model(flavour: str, out: Path) -> str:
    """A tiny random Llama (2 layers, hidden 64) on the real tokenizer, laid out as the Hub repo of `flavour` has
    it: config, generation config, tokenizer files as published, weights only (no transformers-5 rewrite)."""
    import shutil

    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, LlamaForCausalLM

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for f in (FIXTURE / flavour).iterdir():
        shutil.copy(f, out / f.name)
    shutil.copy(FIXTURE / "tokenizer.json", out / "tokenizer.json")
    torch.manual_seed(0)
    model = LlamaForCausalLM(AutoConfig.from_pretrained(out)).to(torch.bfloat16)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    return str(out)


@pytest.fixture(scope="session")
def unsloth_run(tmp_path_factory):
    """A run folder trained through Unsloth on the tiny model (GPU tests only), shared by the GPU modules."""
    from train_unsloth import train

    tmp = tmp_path_factory.mktemp("gpu")
    return train(**quick_args(tmp, backend="unsloth", max_steps=20, max_samples=32, learning_rate=2e-2))


def weights(path: Path):
    """A small safetensors file whose header and size agree, as RunFolder and infer.py check them."""
    import torch
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(4)}, str(path))


def checkpoint(run: Path, step: int, parts=("trainer_state.json", "adapter_model.safetensors", "optimizer.pt")):
    """run/checkpoint-<step> holding `parts`, each as complete as the trainer leaves it (JSON for the others).
    Returns its path."""
    ckpt = run / f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    for name in parts:
        if name.endswith(".safetensors"):
            weights(ckpt / name)
        else:
            (ckpt / name).write_text("{}")
    return ckpt
