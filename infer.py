"""Talk to a fine-tuned model: one prompt, an interactive chat, or a JSONL batch; optionally beside the base.

    python infer.py --adapter outputs/run --instruction "비밀번호를 안전하게 만드는 방법은?"
    python infer.py --adapter outputs/run --chat
    python infer.py --adapter outputs/run --input_file questions.jsonl --output_file answers.jsonl
    python infer.py --adapter outputs/run --instruction "..." --compare_base
    python infer.py --model_name unsloth/Meta-Llama-3.1-8B --prompt alpaca_ko --instruction "..."

The base model, template, max_seq_length and 4-bit setting come from the run's run.json. On a GPU with
Unsloth, generation uses FastLanguageModel.for_inference; elsewhere plain transformers generate, which
--cuda_graphs on a GPU compiles into CUDA graphs (static KV cache).
"""

import logging
import sys

from sftkit.cli import run_cli
from sftkit.errors import UserError
from sftkit.batchfile import answered, batch_settings, check_output_path, read_prompts, run_batch
from sftkit.generate import COMPARE_NEEDS_ADAPTER, MERGED_CANNOT_COMPARE, open_generator
from sftkit import checks, prompts
from sftkit.recorded import adapter_record

log = logging.getLogger("sftkit")


def infer(
    adapter: str = "",
    model_name: str = "",
    prompt: str = "",
    instruction: str = "",
    input: str = "",
    chat: bool = False,
    input_file: str = "",
    output_file: str = "",
    batch_size: int = 8,
    compare_base: bool = False,
    max_new_tokens: int = 128,
    do_sample: bool = False,
    temperature: float = 0.7,
    top_p: float = 0.9,
    top_k: int = 50,
    repetition_penalty: float = 1.0,
    seed: int = 3407,
    backend: str = "auto",
    dtype: str = "auto",
    load_in_4bit: bool = True,
    max_seq_length: int = 0,
    merge_adapter: bool = False,
    cuda_graphs: bool = False,
    system: str = "",
):
    """Generate answers with a trained adapter (or a base model).

    Args:
      adapter: a run folder written by train_unsloth.py, or one of its checkpoint-N folders (a killed run's too).
      model_name: base model (Hub id or folder); with --adapter it overrides the recorded base.
      prompt: template name from prompts/ for a plain --model_name (default alpaca_ko); a run uses its own.
      instruction: the question or task (one-prompt mode).
      input: optional extra context for the instruction.
      chat: interactive mode: read prompts line by line from stdin until EOF or Ctrl-C.
      input_file: JSONL with 'instruction' (and 'input') per line: batch mode.
      output_file: where batch mode appends answers; a rerun skips rows already answered.
      batch_size: prompts per generate call in batch mode.
      compare_base: also answer with the adapter disabled, and show both (needs --adapter).
      max_new_tokens: most tokens to generate per answer.
      do_sample: sample instead of greedy decoding.
      temperature: sampling temperature (with --do_sample).
      top_p: nucleus sampling mass (with --do_sample).
      top_k: sample among the k likeliest tokens (with --do_sample).
      repetition_penalty: >1 discourages repeating tokens.
      seed: random seed for sampling.
      backend: auto | unsloth | hf, as in training.
      dtype: auto | bf16 | fp16 | fp32.
      load_in_4bit: load the base in 4-bit on a GPU (taken from run.json with --adapter).
      max_seq_length: context length (0 = the run's, or 2048).
      merge_adapter: fold the adapter into the base weights before decoding (faster; in 4-bit, re-quantized).
      cuda_graphs: GPU of compute capability 8.0+: decode through CUDA graphs (plain transformers).
      system: system prompt for chat templates (one prompt, --chat, batch lines without their own "system").
    """
    if not (instruction.strip() or chat or input_file):
        raise UserError("say what to answer: --instruction '...', --chat, or --input_file prompts.jsonl.")
    modes = [m for m, on in (("--instruction", instruction.strip()), ("--chat", chat), ("--input_file", input_file))
             if on]
    if len(modes) > 1:  # one would be ignored without a word
        raise UserError(f"{' and '.join(modes)} are different ways to prompt (one prompt, a conversation, a file of "
                        "prompts): pass one of them.")
    for name, value in (("batch_size", batch_size), ("max_new_tokens", max_new_tokens)):
        if int(value) < 1:
            raise UserError(f"--{name} must be a positive whole number, got {value!r}.")
    if do_sample and not (temperature > 0 and 0 < top_p <= 1 and top_k >= 0):
        raise UserError(f"--do_sample needs --temperature > 0, 0 < --top_p <= 1 and --top_k >= 0 (got {temperature}, "
                        f"{top_p}, {top_k}); for the likeliest answer every time, drop --do_sample.")
    if not repetition_penalty > 0:  # transformers refuses it only after the model has loaded
        raise UserError(f"--repetition_penalty must be above 0 (1.0: none; above 1 discourages repeats), got "
                        f"{repetition_penalty!r}.")
    checks.seed(seed)
    if input_file and not output_file:
        raise UserError("--input_file needs --output_file answers.jsonl (answers are appended there).")
    if compare_base and not adapter:
        raise UserError(COMPARE_NEEDS_ADAPTER)
    if compare_base and merge_adapter:
        raise UserError(MERGED_CANNOT_COMPARE)
    if chat and (sys.stdin is None or sys.stdin.closed):
        raise UserError("--chat reads prompts from standard input, which is closed here. Run it in a terminal, or "
                        "pass --instruction '...' or --input_file prompts.jsonl.")
    gen = {"max_new_tokens": max_new_tokens, "do_sample": do_sample, "repetition_penalty": repetition_penalty}
    if do_sample:
        gen.update(temperature=temperature, top_p=top_p, top_k=top_k)
    rows = read_prompts(input_file, compare_base) if input_file else None  # a bad line fails now, before the load
    if input_file:  # and an output file that is not ours to append to, or was answered with other settings
        check_output_path(output_file)
        template = (adapter_record(adapter).template if adapter else prompts.OWN if prompt == prompts.OWN
                    else prompts.load(prompt or "alpaca_ko").name)  # the name the generator writes into each line
        answered(input_file, output_file, rows, batch_settings(adapter or model_name, template, merge_adapter, gen,
                                                                 system))
    from transformers import set_seed

    g = open_generator(adapter, model_name, prompt, backend, dtype, load_in_4bit, max_seq_length, merge_adapter,
                       cuda_graphs, rows=rows, system=system, **gen)
    set_seed(seed)
    if input_file:
        n = run_batch(g, input_file, output_file, batch_size, compare_base, rows=rows)
        print(f"answered {n} prompts -> {output_file}")
    elif chat:
        chat_loop(g, compare_base)
    else:
        show(g, instruction, input, compare_base)


def show(g, instruction, input="", compare_base=False, history=None):
    """Streams one answer; with compare_base, the base model's answer first."""
    if compare_base:
        print("=== base model (adapter off) ===", flush=True)
        g.answer(instruction, input, stream=True, base=True, history=history)
        print("=== fine-tuned (adapter on) ===", flush=True)
    return g.answer(instruction, input, stream=True, history=history)


def chat_loop(g, compare_base=False):
    """Multi-turn with a chat template (history kept); one-shot per line with an instruction template."""
    history = []
    print("chat: type a message, Enter to send; Ctrl-D or Ctrl-C to quit.", file=sys.stderr)
    while True:
        try:
            line = input_line()
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return
        if not line.strip():
            continue
        if g.template.kind == "chat":
            history = fitting_history(g, line, history)
        try:
            result = show(g, line, "", compare_base, history if g.template.kind == "chat" else None)
        except KeyboardInterrupt:  # stop this answer, keep the session
            print("\n[interrupted]", file=sys.stderr)
            continue
        except UserError as err:  # this message alone is too long: say so, keep the session
            print(f"[{err}]", file=sys.stderr)
            continue
        if g.template.kind == "chat":
            history += [{"role": "user", "content": line}, {"role": "assistant", "content": result["answer"]}]


def fitting_history(g, line: str, history: list) -> list:
    """The newest turns that fit the context window beside this message and the answer: the oldest exchanges go
    first (a long chat ended the session with "prompt 1 ... Shorten them")."""
    kept = list(history)
    while kept and len(g.prompt_ids(line, "", kept)) > g.room:
        kept = kept[2:]  # one user turn and its answer
    if len(kept) < len(history):
        print(f"[the chat outgrew the context window of {g.window} tokens: its {(len(history) - len(kept)) // 2} "
              "oldest exchange(s) are left out from now on]", file=sys.stderr)
    return kept


def input_line():
    print(">>> ", end="", file=sys.stderr, flush=True)
    line = sys.stdin.readline()
    if not line:
        raise EOFError
    return line.rstrip("\n")


if __name__ == "__main__":
    run_cli(infer)
