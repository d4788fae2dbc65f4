"""The Unsloth / plain transformers seam: the only package that knows Unsloth exists.

`choose()` picks backend, device and dtype (importing unsloth first, since it patches transformers, trl and
peft on import) and returns a Choice that answers what the rest asks (CUDA or not, Unsloth or not, which
checkpointing the trainer runs). models.py loads a model and adds LoRA on either path; merging.py writes merged
models. Everything else calls these and never tests for Unsloth itself.
"""

import importlib
import logging
import os
from dataclasses import asdict, dataclass

from ..errors import UserError

log = logging.getLogger("sftkit")

DTYPES = ("auto", "bf16", "fp16", "fp32")
BACKENDS = ("auto", "unsloth", "hf")


@dataclass
class Choice:
    backend: str  # "unsloth" or "hf"
    device: str  # "cuda:N" or "cpu"
    device_name: str
    dtype: str  # "bf16", "fp16" or "fp32"
    reason: str

    def as_dict(self):
        return asdict(self)

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def unsloth(self) -> bool:
        return self.backend == "unsloth"

    def trainer_checkpointing(self, requested: bool) -> bool:
        """Whether the Trainer itself should checkpoint activations: Unsloth does its own (offloaded) checkpointing,
        set up in get_peft_model, and a CPU run has no GPU memory to save; the hf path on a GPU uses the Trainer's."""
        return requested and self.cuda and not self.unsloth

    def torch_dtype(self):
        import torch

        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[self.dtype]


def local_rank() -> int:
    """The GPU this process owns: torchrun and accelerate set LOCAL_RANK; a plain run uses GPU 0."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def has_native_bf16(capability) -> bool:
    # torch.cuda.is_bf16_supported() answers True on a T4 because bf16 can be emulated there, slowly.
    # Native bf16 tensor cores start at compute capability 8.0 (Ampere: A100, A10, L4, RTX 30xx and later).
    return capability[0] >= 8


def choose_dtype(requested: str, cuda: bool, capability=(0, 0), gpu_name: str = "") -> tuple[str, str]:
    """Returns (dtype, reason). Raises UserError when the request cannot work on this hardware."""
    if requested not in DTYPES:
        raise UserError(f"--dtype {requested!r} is not one of {', '.join(DTYPES)}.")
    if not cuda:
        if requested == "fp16":
            raise UserError("--dtype fp16 needs a CUDA GPU (fp16 training on a CPU is unsupported). "
                            "Use --dtype auto (fp32 on a CPU) or --dtype bf16.")
        if requested == "bf16":
            return "bf16", "bf16 asked for; the CPU computes it in software (slower than fp32 on most CPUs)"
        return "fp32", "no CUDA GPU: fp32, since half precision on a CPU is slow and loses accuracy"
    cc = f"compute capability {capability[0]}.{capability[1]}"
    native = has_native_bf16(capability)
    if requested == "bf16" and not native:
        raise UserError(f"--dtype bf16 asked for, but {gpu_name} ({cc}) has no native bf16 (it needs 8.0 or newer: "
                        "A100, L4, RTX 30xx, H100). Use --dtype fp16, or --dtype auto to pick it for you.")
    if requested == "auto":
        if native:
            return "bf16", f"{gpu_name} ({cc}) supports bf16 natively: same range as fp32, no loss scaling"
        return "fp16", f"{gpu_name} ({cc}) has no native bf16 (it needs 8.0 or newer): fp16 with loss scaling"
    return requested, f"--dtype {requested} asked for on {gpu_name} ({cc})"


def attention_kernels(cudnn_attention: bool) -> str:
    """Allows or forbids PyTorch's cuDNN attention kernels for every SDPA call in this process; returns why.

    cuDNN builds an execution plan for each new sequence length. Instruction data change length every batch,
    so a run keeps paying for new plans: on an H100 (benchmarks/step_timeline.py, 8B shape, batch 2 x 4) the
    steps of a first trainer took 2.30 s against 1.19 s for a second trainer that met the same lengths again,
    and SDPA's own CPU time fell 20x. Flash and memory-efficient attention have no plans to build.
    """
    import torch

    if not torch.cuda.is_available():
        return ""
    torch.backends.cuda.enable_cudnn_sdp(cudnn_attention)
    if cudnn_attention:
        return "; cuDNN attention allowed (--cudnn_attention)"
    return "; cuDNN attention off (it re-plans for every new sequence length)"


def choose(backend: str = "auto", dtype: str = "auto", cudnn_attention: bool = False, hf_because: str = "") -> Choice:
    """Picks backend, device and dtype, logs them with the reason in one line, and returns the choice.

    On the Unsloth path this imports unsloth, which must happen before transformers, trl or peft are used.
    `cudnn_attention` False keeps PyTorch from picking cuDNN attention kernels (see attention_kernels).
    `hf_because`: why the caller turned the user's --backend auto into hf (the reason logged instead of theirs).
    """
    import torch

    if backend not in BACKENDS:
        raise UserError(f"--backend {backend!r} is not one of {', '.join(BACKENDS)}.")
    cuda = torch.cuda.is_available()
    if cuda:
        idx = local_rank()
        device, name = f"cuda:{idx}", torch.cuda.get_device_name(idx)
        torch.cuda.set_device(idx)  # each rank of a torchrun job owns one GPU; a plain run owns GPU 0
        dt, dt_reason = choose_dtype(dtype, True, torch.cuda.get_device_capability(idx), name)
    else:
        device, name = "cpu", "CPU"
        dt, dt_reason = choose_dtype(dtype, False)

    why = ""
    if backend == "hf":
        chosen, why = "hf", hf_because or "--backend hf asked for"
    elif not cuda:
        if backend == "unsloth":
            raise UserError("--backend unsloth needs an NVIDIA GPU (Unsloth refuses to import without one). "
                            "Use --backend auto or hf to run on this machine with transformers + peft.")
        chosen, why = "hf", "no CUDA GPU, and Unsloth needs one: plain transformers + peft"
    else:
        try:
            importlib.import_module("unsloth")  # first, so it can patch transformers/trl/peft before their use
            chosen, why = "unsloth", "CUDA GPU present and unsloth imported"
        except Exception as err:  # ImportError, or Unsloth's own NotImplementedError on unsupported setups
            if backend == "unsloth":
                raise UserError(f"--backend unsloth asked for, but unsloth failed to import: {err}. "
                                "Install it with `pip install -r requirements.txt`, or use --backend hf.") from err
            chosen, why = "hf", f"unsloth failed to import ({type(err).__name__}: {err}): plain transformers + peft"
    choice = Choice(chosen, device, name, dt, f"{why}; {dt_reason}{attention_kernels(cudnn_attention)}")
    log.info("backend=%s device=%s (%s) dtype=%s because %s", chosen, device, name, dt, choice.reason)
    return choice




from .models import (add_lora, check_model_path, extend_rope, for_inference, load_adapter, load_model,  # noqa: E402
                     merge_adapter, row_fixer, trainable_in_fp32)
from .merging import merge_device, save_merged, sixteen_bit_gib  # noqa: E402

__all__ = ["Choice", "choose", "choose_dtype", "has_native_bf16", "attention_kernels", "local_rank", "add_lora",
           "check_model_path", "extend_rope", "for_inference", "load_adapter", "load_model", "merge_adapter",
           "row_fixer", "trainable_in_fp32",
           "merge_device", "save_merged", "sixteen_bit_gib"]
