"""Can this machine train? GPU, dtype, library versions that really work, attention kernel, memory.

    python memory_report.py doctor                      (or: python -m sftkit.doctor)
    python memory_report.py doctor --model_name unsloth/Llama-3.2-1B --max_seq_length 1024

Exit status 0 where training can run (Unsloth on a GPU, or the CPU path), 1 where it would fail. The policy
functions take plain values (versions, capability, GiB) and return verdicts, so the tests need no GPU. Unsloth
is imported only on a GPU: on a CPU it refuses to import, and the CPU path never uses it.
"""

import os
import platform
import sys
from dataclasses import dataclass
from importlib import metadata

from . import estimate as est
from .backend import choose_dtype, has_native_bf16
from .errors import UserError
from .probes import bnb_op, flash_attn_op, installed, try_run, xformers_built_for, xformers_op

OK, WARN, FAIL = "ok", "warn", "FAIL"
# Unsloth's ranges as of unsloth 2026.10.7 (requirements.txt); the installed unsloth's own metadata wins.
FALLBACK_RANGES = {"torch": ">=2.4.0,<2.15.0", "transformers": ">=4.52.4,<=5.17.0", "trl": ">=0.18.2,<=1.15.0"}
GB = est.GIB


@dataclass
class Finding:
    status: str  # OK, WARN or FAIL
    text: str


# --- Policy: plain values in, verdicts out. ---------------------------------------------------------------

def unsloth_ranges(requires) -> dict:
    """{'torch': '<2.15.0,>=2.4.0', ...} from unsloth's Requires-Dist lines (markers for this machine, no extras)."""
    from packaging.requirements import Requirement

    out = {}
    for line in requires or ():
        req = Requirement(line)
        if req.name in FALLBACK_RANGES and str(req.specifier) and (
                req.marker is None or req.marker.evaluate({"extra": ""})):
            out[req.name] = str(req.specifier)
    return {**FALLBACK_RANGES, **out}


def version_verdict(name: str, version, spec: str, gpu: bool) -> Finding:
    """A required library: missing is fatal; outside Unsloth's range is fatal on a GPU (Unsloth patches these
    libraries' internals and breaks on versions it was not released for) and harmless on the CPU path."""
    from packaging.specifiers import SpecifierSet

    if version is None:
        return Finding(FAIL, f"{name} is not installed: pip install -r requirements.txt")
    if not spec or SpecifierSet(spec).contains(version, prereleases=True):
        return Finding(OK, f"{name} {version}")
    if gpu:
        return Finding(FAIL, f"{name} {version} is outside Unsloth's range {spec}: pip install -r requirements.txt "
                             "(on Colab/Kaggle with the constraints file, see notebooks/README.md)")
    return Finding(OK, f"{name} {version} (outside Unsloth's range {spec}, which only the GPU path uses)")


def xformers_build_matches(built_for: str, torch_version: str) -> bool:
    """xformers' compiled kernels load only beside the torch (major.minor and CUDA major) they were built for."""
    def key(v):
        base, _, local = str(v).partition("+")
        cuda = local[:4] if local.startswith("cu") else local  # cu128 -> 'cu12', cu130 -> 'cu13'
        return tuple(base.split(".")[:2]), cuda

    (ver_b, cuda_b), (ver_t, cuda_t) = key(built_for), key(torch_version)
    return ver_b == ver_t and (not cuda_b or not cuda_t or cuda_b == cuda_t)


def attention_choice(capability, flash_attn_ok: bool, xformers_ok: bool) -> tuple:
    """(kernel, why) in Unsloth's order: flash-attn (compute capability 8.0+), else xformers, else PyTorch SDPA."""
    if flash_attn_ok and capability[0] >= 8:
        return "flash-attn", "flash-attn imports and the GPU is compute capability 8.0+"
    if xformers_ok:
        return "xformers", "xformers' kernels load and run on this GPU"
    why = "no working flash-attn or xformers"
    if capability[0] < 8:
        why += "; on a T4 SDPA is 8-21% slower than xformers' kernel (Unsloth's own measurements)"
    return "SDPA", why


def memory_verdict(need_gib: float, free_gib: float, total_gib: float) -> Finding:
    """The default job's worst-case peak against the memory free on the GPU now."""
    text = f"default job needs about {need_gib:.1f} GB (worst case); {free_gib:.1f} of {total_gib:.1f} GB free"
    if need_gib <= free_gib:
        return Finding(OK, text)
    why = "; another process holds GPU memory" if free_gib < 0.9 * total_gib else ""
    return Finding(FAIL, f"{text}{why}. Lower --max_seq_length or --per_device_train_batch_size (raise "
                         "--gradient_accumulation_steps to keep the effective batch), or free the GPU")


def exit_code(findings) -> int:
    return 1 if any(f.status == FAIL for f in findings) else 0


def where() -> str:
    if "COLAB_RELEASE_TAG" in os.environ or "COLAB_GPU" in os.environ:
        return "Google Colab"
    if "KAGGLE_KERNEL_RUN_TYPE" in os.environ or "KAGGLE_URL_BASE" in os.environ:
        return "Kaggle"
    return "local"


# --- The report. -------------------------------------------------------------------------------------------

def check_unsloth_first(say, cuda: bool) -> bool:
    """On a GPU, imports unsloth before transformers/trl/peft (so it patches them, as in training); True if it works."""
    version = installed("unsloth")
    if not cuda:
        say(Finding(OK, f"unsloth {version or 'not installed'}: needs a GPU, not used on the CPU path"))
        return False
    works, err = try_run(lambda: __import__("unsloth")) if version else (False, "not installed")
    say(Finding(OK, f"unsloth {version} imports") if works else
        Finding(WARN, f"unsloth {version or ''} fails to import ({err}): training falls back to transformers + peft "
                      "(slower, more memory): pip install -r requirements.txt"))
    return works


def check_gpu_libraries(say, torch_version: str, cuda: bool) -> bool:
    """bitsandbytes and xformers each run a tiny op on the GPU (on a CPU: their versions); True if xformers works."""
    built = xformers_built_for()
    stale = f"it was built for torch {built}, this is torch {torch_version}" if built and not \
        xformers_build_matches(built, torch_version) else ""
    bnb, xf = installed("bitsandbytes"), installed("xformers")
    if not cuda:
        say(Finding(OK, f"bitsandbytes {bnb or 'not installed'}: needs a GPU to check"))
        say(Finding(WARN, f"xformers {xf}: {stale}, so on a GPU its kernels would not load and Unsloth would use "
                          "SDPA") if stale else Finding(OK, f"xformers {xf or 'not installed'}: needs a GPU to check"))
        return False
    works, err = try_run(bnb_op) if bnb else (False, "not installed")
    say(Finding(OK, f"bitsandbytes {bnb} runs a tiny 4-bit op on the GPU") if works else
        Finding(FAIL, f"bitsandbytes {bnb or ''} fails on this GPU ({err}): 4-bit loading (the default) will fail; "
                      "pip install -r requirements.txt"))
    works, err = try_run(xformers_op) if xf else (False, "not installed")
    why = f"; {stale} (no xformers wheel may exist for it yet)" if stale else ""
    say(Finding(OK, f"xformers {xf} runs a tiny attention op on the GPU") if works else
        Finding(WARN, f"xformers {xf or ''} fails on this GPU ({err}){why}: Unsloth uses SDPA"))
    return works


def check_memory(say, torch, cuda: bool, model_name: str, max_seq_length: int, unsloth_ok: bool):
    """The default job (batch 2, LoRA r 16, 4-bit, adamw_8bit) against the free GPU memory; on a CPU, for a T4."""
    try:
        cfg, source = est.load_config(model_name)
    except UserError as err:
        say(Finding(WARN, f"no memory estimate: {err}"))
        return
    if not cuda:
        res = est.estimate(cfg, max_seq_length, 2, 16, est.MODULES, True, "adamw_8bit", "t4")
        say(Finding(OK, f"memory: {model_name} ({source}) at {max_seq_length} tokens x 2 would need about "
                        f"{res['total_gib']:.1f} GB on a T4 ({res['gpu_gib']} GB); the CPU path uses RAM"))
        return
    free, total = (x / GB for x in torch.cuda.mem_get_info(0))
    need = est.estimate(cfg, max_seq_length, 2, 16, est.MODULES, True, "adamw_8bit", total)["total_gib"]
    if not unsloth_ok:  # the plain path holds more (fp32 embeddings and logits, layer inputs on the GPU)
        need += est.hf_extra_gib(cfg, max_seq_length, 2)
    say(memory_verdict(need, free, total))


def doctor(model_name: str = "unsloth/Meta-Llama-3.1-8B", max_seq_length: int = 2048) -> int:
    """Print whether this machine can train the default job, and why; returns the exit status (0 ready, 1 not)."""
    findings = []

    def say(f: Finding):
        findings.append(f)
        print(f"[{f.status:>4}] {f.text}")

    print(f"sftkit doctor: Python {platform.python_version()} on {where()}")
    try:
        import torch
    except Exception as err:
        say(Finding(FAIL, f"torch does not import ({type(err).__name__}: {err}): pip install torch, then "
                          "pip install -r requirements.txt"))
        return exit_code(findings)
    cuda = torch.cuda.is_available()
    cap, name = (torch.cuda.get_device_capability(0), torch.cuda.get_device_name(0)) if cuda else ((0, 0), "CPU")
    say(Finding(OK, f"GPU: {name}, compute capability {cap[0]}.{cap[1]} ({torch.cuda.device_count()} visible), "
                    f"torch {torch.__version__} built for CUDA {torch.version.cuda}" if cuda else
                    f"no CUDA GPU: torch {torch.__version__} (CUDA build: {torch.version.cuda or 'none'}) sees none, "
                    "so training will use the CPU path (transformers + peft)"))
    dtype, why = choose_dtype("auto", cuda, cap, name)
    say(Finding(OK, f"dtype {dtype}: {why}" + (f" (native bf16: {has_native_bf16(cap)})" if cuda else "")))

    ranges = unsloth_ranges(metadata.requires("unsloth") if installed("unsloth") else None)
    for lib in ("torch", "transformers", "trl", "peft"):
        say(version_verdict(lib, installed(lib), ranges.get(lib, ""), cuda))
    unsloth_ok = check_unsloth_first(say, cuda)
    for lib in ("transformers", "trl", "peft"):
        works, err = try_run(lambda: __import__(lib)) if installed(lib) else (True, "")
        if not works:
            say(Finding(FAIL, f"{lib} {installed(lib)} fails to import ({err}): pip install -r requirements.txt"))
    xformers_ok = check_gpu_libraries(say, torch.__version__, cuda)
    if cuda:
        flash_ok = cap[0] >= 8 and installed("flash-attn") is not None and try_run(flash_attn_op)[0]
        kernel, why = attention_choice(cap, flash_ok, xformers_ok)
        say(Finding(OK, f"attention: Unsloth will use {kernel} ({why})" if unsloth_ok else
                    f"attention: PyTorch SDPA on the transformers + peft path (Unsloth would use {kernel}: {why})"))
    else:
        say(Finding(OK, "attention: PyTorch SDPA (CPU path); which kernel Unsloth would use needs a GPU to check"))
    check_memory(say, torch, cuda, model_name, max_seq_length, unsloth_ok)

    if os.environ.get("HF_TOKEN"):
        print("[info] HF_TOKEN is set (not shown)")
    bad = [f for f in findings if f.status == FAIL]
    path = f"Unsloth on {name}" if unsloth_ok else f"transformers + peft on {name}"
    print(f"verdict: ready to train ({path}, {dtype})" if not bad else
          f"verdict: NOT ready: {len(bad)} problem(s) marked FAIL above")
    return exit_code(findings)


def doctor_cli(model_name: str = "unsloth/Meta-Llama-3.1-8B", max_seq_length: int = 2048):
    """Check that this machine can train: GPU, dtype, libraries, attention kernel, memory; exits 1 if it cannot.

    Args:
      model_name: the model whose default job (batch 2, LoRA r 16, 4-bit) is estimated: a known name or a local folder.
      max_seq_length: tokens per row for the estimate (worst case: every row this long).
    """
    code = doctor(model_name, max_seq_length)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    from .cli import run_cli

    run_cli(doctor_cli)
