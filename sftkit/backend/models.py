"""Loading a model on either path, adding LoRA, and switching it to inference."""

import logging
import os
from pathlib import Path

from ..errors import UserError
from . import local_rank

log = logging.getLogger("sftkit")


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
    # "examples/tiny-lama" is a typo'd local path, not a Hub id, when its first folder exists here; and a Hub id
    # is owner/name, so a deeper path is local wherever it is typed (else the Hub is asked, and retried, first).
    local_parent = len(path.parts) > 1 and Path(path.parts[0]).is_dir()
    if (model_name.startswith((".", "/", "~")) or local_parent or len(path.parts) > 2
            or path.suffix in (".json", ".safetensors", ".bin")):
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


def load_model(model_name: str, max_seq_length: int, choice, load_in_4bit: bool = True):
    """Returns (model, tokenizer, notes). The HF token comes from the HF_TOKEN environment variable only."""
    check_model_path(model_name)
    token = os.environ.get("HF_TOKEN") or None
    notes = []
    try:
        model, tokenizer = _from_pretrained(model_name, max_seq_length, choice, load_in_4bit, token, notes)
    except OSError as err:  # not on the Hub, gated, offline, or a folder without weights
        local = "" if Path(model_name).expanduser().exists() else f" There is no folder {model_name!r} in {Path.cwd()}."
        raise UserError(f"could not load model {model_name!r}: {err}.{local} Check the Hub id (or the local folder: "
                        "a relative path is relative to the current folder), log in with HF_TOKEN for a gated model "
                        "such as meta-llama/*, or use an ungated copy such as unsloth/Meta-Llama-3.1-8B.") from err
    if tokenizer.pad_token is None or tokenizer.pad_token == tokenizer.eos_token:
        # A pad token equal to EOS would teach nothing about stopping once padding is masked; Llama 3.1 reserves
        # a token for padding, so use it where the vocabulary has it.
        if "<|finetune_right_pad_id|>" in tokenizer.get_vocab():
            tokenizer.pad_token = "<|finetune_right_pad_id|>"
    return model, tokenizer, notes


def _from_pretrained(model_name, max_seq_length, choice, load_in_4bit, token, notes):
    cuda = choice.cuda
    if choice.unsloth:
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
            # Recorded, not logged: every CPU run would say it, and the backend line already says "cpu".
            notes.append("4-bit loading needs a CUDA GPU (bitsandbytes): the CPU path loads full precision")
        model = AutoModelForCausalLM.from_pretrained(model_name, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(model_name, token=token)
    return model, tokenizer


def add_lora(model, choice, r: int, lora_alpha: int, lora_dropout: float, target_modules: list,
             gradient_checkpointing: bool, seed: int, load_in_4bit: bool, extra: dict | None = None):
    """Wraps the model with LoRA adapters; same settings on both paths. extra: further LoraConfig arguments
    (trainable_token_indices or modules_to_save for the embeddings)."""
    import torch

    linear = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    unknown = sorted(set(target_modules) - linear)
    if unknown:
        raise UserError(f"--target_modules {','.join(unknown)}: no such linear layer in this model. Its linear "
                        f"layers are {','.join(sorted(linear))}.")
    if choice.unsloth:
        from unsloth import FastLanguageModel

        return FastLanguageModel.get_peft_model(
            model, r=r, target_modules=list(target_modules), lora_alpha=lora_alpha, lora_dropout=lora_dropout,
            bias="none", use_gradient_checkpointing="unsloth" if gradient_checkpointing else False,
            random_state=seed, use_rslora=False, loftq_config=None, **(extra or {}))
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if choice.cuda and load_in_4bit:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    elif gradient_checkpointing and choice.cuda:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    torch.manual_seed(seed)  # LoRA's A matrices are drawn at random: same seed, same start
    config = LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, bias="none",
                        target_modules=list(target_modules), task_type="CAUSAL_LM", **(extra or {}))
    return get_peft_model(model, config)


def row_fixer(choice):
    """(name, function) of the backend's own fix for untrained embedding rows, or None where it has none (the plain
    path: sftkit's own)."""
    return ("Unsloth's", unsloth_row_fix) if choice.unsloth else None


def unsloth_row_fix(model, tokenizer, ids_of_rows: list):
    """Unsloth's fix_untrained_tokens (unsloth_zoo): the mean of the trained rows, scaled by how often the rows use
    each token. It refuses frozen matrices (its advice is to train embed_tokens and lm_head in full); peft trains
    the template's rows here (trainable tokens), so the matrices count as trained while it runs."""
    import os

    from unsloth_zoo.tokenizer_utils import fix_untrained_tokens

    from ..special_tokens import matrices

    weights = matrices(model)
    flags = [w.requires_grad for w in weights]
    # the models Unsloth's own trainer-time call leaves alone (it publishes the list in this variable on import)
    ignored = [n for n in os.environ.get("UNSLOTH_IGNORED_TOKENIZER_NAMES", "").split("\n") if n]
    try:
        for w in weights:
            w.requires_grad_(True)
        rows = [{"input_ids": r} for r in ids_of_rows]  # a list, not a Dataset: no progress bar while it counts
        fix_untrained_tokens(model, tokenizer, rows, ignored, eps=1e-16)
    finally:
        for w, flag in zip(weights, flags):
            w.requires_grad_(flag)


def trainable_in_fp32(model, choice):
    """fp16 on the plain path: call once the trainer is built. fp16 training runs a gradient scaler, which unscales
    only fp32 gradients, and TRL's SFTTrainer turns a quantized model's LoRA weights into bf16 (the QLoRA paper's
    choice, made for bf16 runs): a T4's fp16 run then crashed at the first optimizer step. The base stays 4-bit /
    16-bit; autocast still runs the matmuls in fp16. Unsloth's trainer handles this on its path."""
    if choice.unsloth or choice.dtype != "fp16":
        return 0
    return trainables_to_fp32(model)


def trainables_to_fp32(model) -> int:
    """Puts every trainable parameter in fp32 (the gradient scaler's dtype); returns how many moved."""
    import torch

    moved = 0
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
            moved += 1
    return moved


def for_inference(model, choice):
    """Unsloth's 2x fast generation path, or eval mode with the KV cache on the hf path."""
    if choice.unsloth:
        from unsloth import FastLanguageModel

        FastLanguageModel.for_inference(model)
    else:
        model.eval()
    model.config.use_cache = True
    return model


def load_adapter(model, adapter_dir: str):
    """Puts a saved LoRA adapter on a loaded base model (either backend)."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, adapter_dir)
    except RuntimeError as err:  # "size mismatch for ...lora_A.weight": trained on a base of another shape
        if "size mismatch" not in str(err):
            raise
        raise UserError(f"the adapter in {adapter_dir} was trained on a base model of another shape than "
                        f"{getattr(model.config, '_name_or_path', 'the one loaded')} ({next(x.strip() for x in str(err).splitlines() if 'size mismatch' in x)[:160]}"
                        "). Drop --model_name to use the run's own base, or pass the model it was trained on.") from err


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
