"""Chooses Unsloth or plain transformers + peft, and the dtype; loads the model, adds LoRA, switches to inference.

This is the only module that knows Unsloth exists, so the GPU and CPU paths differ in one place. Unsloth
patches transformers, trl and peft when it is imported, so `choose()` imports it before anything else does.
"""

import importlib
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import UserError

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


def check_model_path(model_name: str):
    """A local folder must hold a model; anything path-like that does not exist is a typo, not a Hub id."""
    path = Path(model_name).expanduser()
    if path.is_dir():
        if (path / "config.json").exists():
            return
        hint = (" It holds a LoRA adapter (adapter_config.json): use it with infer.py --adapter, or pass the base "
                "model's name." if (path / "adapter_config.json").exists() else "")
        raise UserError(f"--model_name {model_name!r} is a folder without config.json, so it is not a saved model."
                        f"{hint} Pass a folder made by save_pretrained, or a Hub id such as unsloth/Meta-Llama-3.1-8B.")
    # "examples/tiny-lama" is a typo'd local path, not a Hub id, when its first folder exists here.
    local_parent = len(path.parts) > 1 and Path(path.parts[0]).is_dir()
    if model_name.startswith((".", "/", "~")) or local_parent or path.suffix in (".json", ".safetensors", ".bin"):
        raise UserError(f"--model_name {model_name!r} does not exist. Check the path (it is relative to the "
                        "current folder), or pass a Hub id such as unsloth/Meta-Llama-3.1-8B.")


def extend_rope(config, max_seq_length: int) -> str:
    """hf path: lets the model reach max_seq_length past its trained window, as Unsloth does on its path.

    A model with llama3 RoPE scaling (Llama 3.1) already handles long context: only its window is widened.
    Any other RoPE gets linear scaling by max_seq_length / window. Returns a log message ('' if unchanged).
    """
    window = getattr(config, "max_position_embeddings", None)
    if not window or max_seq_length <= window:
        return ""
    params = dict(getattr(config, "rope_parameters", None) or {})
    factor = max_seq_length / window
    config.max_position_embeddings = max_seq_length
    if params.get("rope_type") == "llama3":
        return f"RoPE: window {window} -> {max_seq_length}, keeping the model's native llama3 RoPE scaling"
    params.update(rope_type="linear", factor=factor)
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    config.rope_parameters = params
    return f"RoPE: window {window} -> {max_seq_length} with linear RoPE scaling, factor {factor:.3g}"


def load_model(model_name: str, max_seq_length: int, choice: Choice, load_in_4bit: bool = True):
    """Returns (model, tokenizer, notes). The HF token comes from the HF_TOKEN environment variable only."""
    check_model_path(model_name)
    token = os.environ.get("HF_TOKEN") or None
    notes = []
    try:
        model, tokenizer = _from_pretrained(model_name, max_seq_length, choice, load_in_4bit, token, notes)
    except OSError as err:  # not on the Hub, gated, offline, or a folder without weights
        raise UserError(f"could not load model {model_name!r}: {err}. Check the Hub id (or the local folder), log in "
                        "with HF_TOKEN for a gated model such as meta-llama/*, or use an ungated copy such as "
                        "unsloth/Meta-Llama-3.1-8B.") from err
    if tokenizer.pad_token is None or tokenizer.pad_token == tokenizer.eos_token:
        # A pad token equal to EOS would teach nothing about stopping once padding is masked; Llama 3.1 reserves
        # a token for padding, so use it where the vocabulary has it.
        if "<|finetune_right_pad_id|>" in tokenizer.get_vocab():
            tokenizer.pad_token = "<|finetune_right_pad_id|>"
    return model, tokenizer, notes


def _from_pretrained(model_name, max_seq_length, choice, load_in_4bit, token, notes):
    cuda = choice.device.startswith("cuda")
    if choice.backend == "unsloth":
        from unsloth import FastLanguageModel

        # Unsloth widens/scales RoPE itself when max_seq_length exceeds the model's window, and logs it.
        model, tokenizer = FastLanguageModel.from_pretrained(
            model_name=model_name, max_seq_length=max_seq_length, dtype=choice.torch_dtype(),
            load_in_4bit=load_in_4bit, token=token, device_map={"": local_rank()})
    else:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

        config = AutoConfig.from_pretrained(model_name, token=token)
        rope_note = extend_rope(config, max_seq_length)
        if rope_note:
            log.info(rope_note)
            notes.append(rope_note)
        kwargs = {"config": config, "token": token, "dtype": choice.torch_dtype()}
        if cuda:
            kwargs["device_map"] = {"": local_rank()}
            if load_in_4bit:  # the plain QLoRA recipe: NF4 weights, double quantisation, 16-bit compute
                kwargs["quantization_config"] = BitsAndBytesConfig(
                    load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                    bnb_4bit_compute_dtype=choice.torch_dtype())
        elif load_in_4bit:
            notes.append("4-bit loading needs a CUDA GPU (bitsandbytes): the CPU path loads full precision")
            log.info(notes[-1])
        model = AutoModelForCausalLM.from_pretrained(model_name, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(model_name, token=token)
    return model, tokenizer


def add_lora(model, choice: Choice, r: int, lora_alpha: int, lora_dropout: float, target_modules: list,
             gradient_checkpointing: bool, seed: int, load_in_4bit: bool):
    """Wraps the model with LoRA adapters; same settings on both paths."""
    import torch

    linear = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    unknown = sorted(set(target_modules) - linear)
    if unknown:
        raise UserError(f"--target_modules {','.join(unknown)}: no such linear layer in this model. Its linear "
                        f"layers are {','.join(sorted(linear))}.")
    if choice.backend == "unsloth":
        from unsloth import FastLanguageModel

        return FastLanguageModel.get_peft_model(
            model, r=r, target_modules=list(target_modules), lora_alpha=lora_alpha, lora_dropout=lora_dropout,
            bias="none", use_gradient_checkpointing="unsloth" if gradient_checkpointing else False,
            random_state=seed, use_rslora=False, loftq_config=None)
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if choice.device.startswith("cuda") and load_in_4bit:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    elif gradient_checkpointing and choice.device.startswith("cuda"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    torch.manual_seed(seed)  # LoRA's A matrices are drawn at random: same seed, same start
    config = LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, bias="none",
                        target_modules=list(target_modules), task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def for_inference(model, choice: Choice):
    """Unsloth's 2x fast generation path, or eval mode with the KV cache on the hf path."""
    if choice.backend == "unsloth":
        from unsloth import FastLanguageModel

        FastLanguageModel.for_inference(model)
    else:
        model.eval()
    model.config.use_cache = True
    return model


def load_adapter(model, adapter_dir: str):
    """Puts a saved LoRA adapter on a loaded base model (either backend)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, adapter_dir)


def merge_adapter(model):
    """Folds a loaded (peft) LoRA adapter into the base weights and returns the bare model.

    In 4-bit, peft dequantizes, adds the LoRA product and quantizes again, and the new quantization state says
    float32 (the dtype it quantized from), so those weights would dequantize to float32 and meet 16-bit
    activations (Unsloth's decode path fails on that). They are set back to the dtype the 4-bit weights
    dequantized to before the merge.
    """
    def states(m):
        return [s for mod in m.modules() if (s := getattr(getattr(mod, "weight", None), "quant_state", None))]

    before = {s.dtype for s in states(model) if hasattr(s, "dtype")}
    model = model.merge_and_unload()
    if len(before) == 1:  # one dtype for all 4-bit weights, as bitsandbytes loads them; else leave them be
        (dtype,) = before
        for state in states(model):
            if hasattr(state, "dtype"):
                state.dtype = dtype
    return model
