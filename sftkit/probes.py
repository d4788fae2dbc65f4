"""Probes for the doctor: what is installed, and whether it really runs here (a tiny op on the GPU each)."""

import contextlib
import io
import json
import logging
from importlib import metadata
from pathlib import Path

def installed(name: str):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def xformers_built_for():
    """The torch version the installed xformers wheel was compiled against (its cpp_lib.json), without importing it."""
    try:
        files = metadata.files("xformers") or []
        path = next((Path(f.locate()) for f in files if str(f).endswith("xformers/cpp_lib.json")), None)
        return json.loads(path.read_text())["version"]["torch"] if path else None
    except (metadata.PackageNotFoundError, OSError, ValueError, KeyError, TypeError):
        return None


def quietly(fn):
    """Runs fn with Python-level output held back: Unsloth prints a banner on import, and bitsandbytes and
    xformers log warnings (which this report states in one line instead)."""
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return fn()
    finally:
        logging.disable(logging.NOTSET)


def try_run(fn) -> tuple:
    try:
        quietly(fn)
        return True, ""
    except Exception as err:  # any failure means "does not work here"; its first sentence says why
        first = str(err).strip().splitlines()[0].split(". ")[0] if str(err).strip() else ""
        return False, f"{type(err).__name__}: {first}"


def bnb_op():
    import bitsandbytes.functional as F
    import torch

    x = torch.randn(64, 64, device="cuda", dtype=torch.float16)
    q, state = F.quantize_4bit(x, quant_type="nf4")
    y = F.dequantize_4bit(q, state)
    torch.cuda.synchronize()
    if not torch.isfinite(y).all() or (y - x).norm() / x.norm() > 0.25:
        raise RuntimeError("NF4 round trip is wrong")


def xformers_op():
    import torch
    import xformers._cpp_lib as lib
    import xformers.ops as xops

    if lib._cpp_library_load_exception is not None:  # what makes Unsloth drop xformers
        raise lib._cpp_library_load_exception
    q = torch.randn(1, 16, 2, 64, device="cuda", dtype=torch.float16)
    out = xops.memory_efficient_attention(q, q, q)
    torch.cuda.synchronize()
    if not torch.isfinite(out).all():
        raise RuntimeError("attention output is not finite")


def flash_attn_op():
    import flash_attn  # noqa: F401  (Unsloth only checks that it imports with its CUDA extension)
    from flash_attn import flash_attn_interface  # noqa: F401
