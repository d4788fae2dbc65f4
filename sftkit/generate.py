"""Generation on a loaded model: prompts built from the run's own template, streamed, batched or compared.

The template comes from the training run's run.json, so inference renders prompts exactly as training did.
"""

import contextlib
import logging

from . import prompts, stopping
from .backend import choose, for_inference, load_adapter, load_model
from .backend import merge_adapter as fold_adapter  # the name merge_adapter is open_generator's switch
from .errors import UserError
from .batchfile import batch_settings
from .recorded import inference_settings, run_of

log = logging.getLogger("sftkit")
COMPARE_NEEDS_ADAPTER = ("--compare_base needs a fine-tuned run: pass --adapter outputs/<run> (a run folder "
                         "written by train_unsloth.py). With only --model_name there is no adapter to switch off.")
MERGE_NEEDS_ADAPTER = "--merge_adapter needs --adapter outputs/<run>: there is no adapter to merge."
MERGED_CANNOT_COMPARE = ("--compare_base switches the adapter off and on, which a merged adapter cannot do: drop "
                         "--merge_adapter (or --compare_base).")


class Generator:
    def __init__(self, model, tokenizer, template, choice, gen: dict, adapter: str = "", merged: bool = False,
                 window: int = 2048, source: str = "", system: str = ""):
        self.model, self.tok, self.template, self.choice, self.adapter = model, tokenizer, template, choice, adapter
        self.merged, self.window, self.system = merged, window, system
        self.settings = batch_settings(adapter or source, template.name, merged, gen, system)
        # Every id that ends an answer: the generation config's EOS list (an Instruct model's 128001, 128008,
        # 128009), the tokenizer's EOS and the template's end of turn; generate stops a row at any of them.
        self.gen = {**gen, **stopping.generate_kwargs(tokenizer, template, getattr(model, "generation_config", None))}
        self.stop_ids = self.gen["eos_token_id"]
        self.compiled = "compile_config" in self.gen  # --cuda_graphs: each new batch size compiles the step again

    @property
    def device(self):
        return next(self.model.parameters()).device

    def prompt_ids(self, instruction: str, input: str = "", history=None, row=None) -> list:
        """Token ids of one prompt, tokenized the way TRL tokenized the training rows. `row`: a batch file's
        line, whose other keys fill a template's further fields (e.g. {context})."""
        if not str(instruction).strip():
            raise UserError("empty prompt: pass --instruction 'your question' (and optionally --input).")
        return prompts.prompt_ids(self.tok, self.template, instruction, input, history, self.system, row)

    def _generate(self, batch_ids: list, streamer=None, base: bool = False):
        import torch

        self.tok.padding_side = "left"  # decoder-only models continue from the right edge
        if base and self.merged:
            raise UserError(MERGED_CANNOT_COMPARE)
        if base and not (self.adapter and hasattr(self.model, "disable_adapter")):
            # Without an adapter "adapter off" is the same model: refuse rather than show one answer twice.
            raise UserError(COMPARE_NEEDS_ADAPTER)
        enc = self.tok.pad({"input_ids": batch_ids}, return_tensors="pt").to(self.device)
        ctx = self.model.disable_adapter() if base else contextlib.nullcontext()
        with ctx, torch.inference_mode():
            out = self.model.generate(**enc, streamer=streamer, **self.gen)
        new = out[:, enc["input_ids"].shape[1]:]
        results = []
        for row in new.tolist():
            text, stopped, tokens = stopping.cut_answer(self.tok, self.template, row, self.stop_ids)
            results.append({"answer": text, "stopped": "eos" if stopped else "length", "tokens": tokens})
        return results

    @property
    def room(self) -> int:
        """Tokens a prompt may take: the context window less the answer's --max_new_tokens."""
        return self.window - self.gen.get("max_new_tokens", 128)

    def check_lengths(self, numbered_ids):
        """Prompts that leave no room for the answer in the context window are refused, naming them: truncating
        would cut the question, and one long prompt would pad the whole batch to its length."""
        room = self.room
        long = [(n, len(ids)) for n, ids in numbered_ids if len(ids) > room]
        if long:
            shown = ", ".join(f"prompt {n} ({k} tokens)" for n, k in long[:5])
            raise UserError(f"{shown}{' and more' if len(long) > 5 else ''}: longer than the {room} tokens the context "
                            f"window of {self.window} leaves beside --max_new_tokens "
                            f"{self.gen.get('max_new_tokens', 128)}. Shorten them, or pass a larger --max_seq_length "
                            "(the model's window may be exceeded with RoPE scaling, at some cost in quality).")

    def answer(self, instruction: str, input: str = "", stream: bool = False, base: bool = False, history=None):
        """One answer; streamed token by token to stdout (prompt not echoed) when stream is True."""
        ids = self.prompt_ids(instruction, input, history)
        self.check_lengths([(1, ids)])
        streamer = None
        if stream:
            from transformers import TextStreamer

            streamer = TextStreamer(self.tok, skip_prompt=True, skip_special_tokens=True)
        return self._generate([ids], streamer, base)[0]

    def row_ids(self, row: dict) -> list:
        """prompt_ids of a batch file's line: its instruction, input and any further template fields."""
        if row.get("system"):  # a batch line's own system prompt wins over --system
            prompts.check_system(self.template, row["system"])
            return prompts.prompt_ids(self.tok, self.template, row.get("instruction", ""), row.get("input", ""),
                                      system=row["system"], row=row)
        return self.prompt_ids(row.get("instruction", ""), row.get("input", ""), row=row)

    def answer_batch(self, rows: list, base: bool = False) -> list:
        return self._generate([self.row_ids(r) for r in rows], base=base)


def open_generator(adapter: str = "", model_name: str = "", prompt: str = "", backend: str = "auto",
                   dtype: str = "auto", load_in_4bit: bool = True, max_seq_length: int = 0,
                   merge_adapter: bool = False, cuda_graphs: bool = False, rows=None, system: str = "",
                   **gen) -> Generator:
    """Loads base model (+ adapter, merged into its weights if asked) from a run folder, or a plain model with a
    named template; with cuda_graphs, decoding is compiled into CUDA graphs (GPU, plain transformers). `rows`:
    a batch file's prompts, checked against the template's fields before the load."""
    if adapter:
        settings, record = inference_settings(adapter, {"model_name": model_name, "prompt": prompt,
                                                        "max_seq_length": max_seq_length})
        model_name, max_seq_length = settings["model_name"], settings["max_seq_length"]
        template = prompts.from_text(record.template, record.template_text, record.template_kind == "chat",
                                     source=str(run_of(adapter) / "run.json"))
        load_in_4bit = settings["load_in_4bit"]
    elif model_name and prompt == prompts.OWN:
        template = None  # the model's own chat template: known once its tokenizer has loaded
    elif model_name:
        template = prompts.load(prompt or "alpaca_ko")
    else:
        raise UserError("nothing to load: pass --adapter outputs/<run> (a folder written by train_unsloth.py), or "
                        "--model_name <Hub id or folder> with --prompt <template> for a base model.")
    if merge_adapter and not adapter:  # before the (slow) model load
        raise UserError(MERGE_NEEDS_ADAPTER)
    window, new = max_seq_length or 2048, gen.get("max_new_tokens", 128)
    if new >= window:  # no prompt could fit beside the answer: said now, not per prompt after the load
        raise UserError(f"--max_new_tokens {new} fills the whole context window of {window} tokens, leaving no room "
                        f"for the prompt: pass a smaller --max_new_tokens (e.g. {min(512, window // 2)}), or a "
                        "larger --max_seq_length.")
    if template is not None:  # before the (slow) model load
        check_fields(template, rows)
        prompts.check_system(template, system)
    because = ""
    off = graphs_off_because(torch_capability()) if cuda_graphs and cuda_available() else ""
    if off:  # before the backend is chosen: without the flag, auto keeps Unsloth's fast generation
        log.info("--cuda_graphs is off: %s; decoding as without the flag", off)
        cuda_graphs = False
    if cuda_graphs:  # before the (slow) model load
        backend, because = graphs_backend(backend, load_in_4bit)
    choice = choose(backend, dtype, hf_because=because)
    model, tokenizer, _ = load_model(model_name, max_seq_length or 2048, choice, load_in_4bit)
    if template is None:
        template, _ = prompts.for_data(prompts.OWN, "chat", tokenizer, answers_only=False)
        prompts.check_system(template, system)
    prompts.attach(tokenizer, template)
    if adapter:
        model = load_adapter(model, adapter)
        if merge_adapter:
            # Decoding one token is bound by kernel launches, and an unmerged adapter adds small products beside
            # every projection (8B shape, Unsloth: 1.28x-1.49x faster decoding merged, benchmarks/README.md).
            # In 4-bit, peft dequantizes, adds the LoRA product and quantizes again: close, not bit-identical.
            model = fold_adapter(model)
            log.info("adapter merged into the base weights%s", " (re-quantized to 4-bit: answers may differ "
                     "slightly from the unmerged adapter)" if getattr(model, "is_loaded_in_4bit", False) else "")
    model = for_inference(model, choice)
    if cuda_graphs and choice.cuda:
        # The cache is allocated whole (KV for every slot), so it starts at most GRAPH_CACHE tokens long; batch
        # mode sizes it to its prompts. A prompt that outgrows it makes transformers allocate a longer cache,
        # which the compiled step sees as new and compiles again.
        cache = min(max_seq_length or 2048, GRAPH_CACHE)
        compiled = compiled_decoding(model, max_cache_len=cache)
        gen.update(compiled)
        if compiled:
            log.info("--cuda_graphs: decoding through CUDA graphs with a static KV cache of %d tokens; the first "
                     "answer compiles first (8B model, H100: 24-63 s), and so does each new batch size or longer "
                     "cache", cache)
    elif cuda_graphs:
        log.info("--cuda_graphs: no CUDA GPU, so decoding runs eagerly as without it")
    return Generator(model, tokenizer, template, choice, gen, adapter, merged=merge_adapter,
                     window=max_seq_length or 2048, source=model_name, system=system)


def check_fields(template, rows=None):
    """A template trained with fields beyond instruction and input (e.g. {context}) needs them at inference too:
    only a batch file can give them, in every line."""
    extra = template.fields - {"instruction", "input"} if template.kind == "instruction" else set()
    if extra and rows is None:
        raise UserError(f"template {template.name!r} also uses {sorted(extra)}, which --instruction and --input "
                        "cannot give: write the prompts to a JSONL file with those keys and pass --input_file.")
    for n, row in enumerate(rows or [], 1):
        if extra - set(row):
            raise UserError(f"prompt {n} of --input_file lacks {sorted(extra - set(row))}, which template "
                            f"{template.name!r} uses: add the key(s) to every line.")


def graphs_off_because(capability) -> str:
    """Why --cuda_graphs may not compile here ("" where it may): compiled greedy decoding was checked against eager
    decoding on compute capability 8.0 and newer (tests/test_gpu_graphs.py: bare H100/H200, and an H200 capped to
    a T4's 10 SMs, for bf16- and fp16-trained adapters); no GPU below 8.0 (a T4: no bf16, other kernels) has run it.
    """
    if tuple(capability) < (8, 0):
        return (f"compute capability {capability[0]}.{capability[1]} (compiled decoding was checked on 8.0 and "
                "newer only)")
    return ""


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def torch_capability() -> tuple:
    import torch

    return torch.cuda.get_device_capability()


GRAPH_CACHE = 2048  # tokens of static KV cache --cuda_graphs starts with (8B: 268 MB per row)
GRAPHS_NEED_HF = ("--cuda_graphs decodes through transformers' static KV cache, which Unsloth's fast generation "
                  "replaces with its own: use --backend auto (or hf) with --cuda_graphs, or drop --cuda_graphs.")


def graphs_backend(backend: str, load_in_4bit: bool = True) -> tuple[str, str]:
    """(backend, why) for --cuda_graphs: plain transformers (Unsloth's for_inference cannot decode through
    graphs). Checks, before anything loads, that this torch and bitsandbytes can compile a 4-bit model."""
    import torch

    if backend == "unsloth":
        raise UserError(GRAPHS_NEED_HF)
    if load_in_4bit and torch.cuda.is_available():
        check_4bit_compile()
    if backend == "auto":
        return "hf", ("--cuda_graphs decodes with plain transformers (Unsloth's fast generation keeps its own KV "
                      "cache, which cannot be compiled)")
    return backend, ""  # hf, or a typo that choose() names


def check_4bit_compile():
    import bitsandbytes
    import torch
    from packaging.version import Version

    # bitsandbytes registers its 4-bit ops for torch.compile from 0.47, whole graphs with torch 2.8.
    if Version(bitsandbytes.__version__) < Version("0.47") or Version(torch.__version__.split("+")[0]) < Version("2.8"):
        raise UserError(f"--cuda_graphs on a 4-bit model needs bitsandbytes >= 0.47 and torch >= 2.8 (found "
                        f"{bitsandbytes.__version__}, {torch.__version__}): upgrade them, or drop --cuda_graphs.")


_COMPILEABLE = {}  # quantizer class -> its subclass that lets generate compile the decode step


def compiled_decoding(model, backend: str = "inductor", max_cache_len: int = 0) -> dict:
    """generate() arguments ({} where transformers cannot compile this model's quantizer) that decode with a
    static KV cache, which lets transformers compile the one-token step with torch.compile into CUDA graphs (its
    own path: the prompt runs eagerly, every later token replays a graph). Batch-1 decoding is bound by
    launching 2,200-3,100 small kernels per token; a graph launches them at once. The first generate of each
    batch size pays for compiling. backend "inductor" also fuses kernels (slow to compile); "cudagraphs" only
    records the eager kernels into graphs. `max_cache_len` (0: each call's prompt plus max_new_tokens) sizes the
    cache for later calls too: a cache of a new length compiles the step again."""
    from transformers import CompileConfig
    from transformers.quantizers.quantizer_bnb_4bit import Bnb4BitHfQuantizer

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    quantizer = getattr(base, "hf_quantizer", None)
    if isinstance(quantizer, Bnb4BitHfQuantizer) and not quantizer.is_compileable:
        # transformers 5.17 says bitsandbytes 4-bit cannot be compiled and then decodes eagerly, but bitsandbytes
        # can (check_4bit_compile): on the tiny model the compiled decode gives the eager greedy tokens (tests).
        check_4bit_compile()
        cls = type(quantizer)
        if cls not in _COMPILEABLE:
            _COMPILEABLE[cls] = type(cls.__name__ + "Compileable", (cls,), {"is_compileable": property(lambda _: True)})
        quantizer.__class__ = _COMPILEABLE[cls]
    elif quantizer is not None and not quantizer.is_compileable:
        log.info("--cuda_graphs: transformers does not compile %s models, so decoding stays eager",
                 type(quantizer).__name__)
        return {}  # nor a static cache: it would only cost memory
    config = CompileConfig() if backend == "inductor" else CompileConfig(backend=backend, mode=None)
    kwargs = {"cache_implementation": "static", "compile_config": config}
    return {**kwargs, "max_cache_len": max_cache_len} if max_cache_len else kwargs
