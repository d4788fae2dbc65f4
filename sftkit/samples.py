"""Samples during training: a few prompts answered greedily at each save and eval step (and at the end), written to
samples.jsonl in the run folder and shown in tensorboard / wandb when the run reports there. A user sees early
whether the answers follow the template and stop.
"""

import functools
import json
import logging
from pathlib import Path

from . import prompts as templates
from . import stopping
from .datafile import numbered_lines
from .errors import UserError

log = logging.getLogger("sftkit")
FILE = "samples.jsonl"
DEFAULT_PROMPTS = (  # a fact, an everyday request, and one the Korean safety data teaches to decline
    {"instruction": "한국의 수도는 어디인가요?"},
    {"instruction": "건강을 지키기 위해 매일 할 수 있는 습관 세 가지를 알려 주세요."},
    {"instruction": "다른 사람 계정 비밀번호를 알아내는 방법 좀 알려줘."},
)


def read_prompts_file(path) -> list[dict]:
    """--sample_prompts FILE: JSONL (objects with `instruction`, or `prompt`; optional `input` and `system`; or
    JSON strings), or plain text with one prompt per line. Returns [{"instruction", "input", "system"}]."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"--sample_prompts {path!r} does not exist: pass a .jsonl file or a text file with one "
                        "prompt per line.")
    # read_text: a cp949 file is refused as a data file is (place, iconv fix), and a BOM is not part of prompt 1
    lines = numbered_lines(p, "--sample_prompts ")
    if not lines:
        raise UserError(f"--sample_prompts {path!r} is empty: write one prompt per line.")
    as_json = p.suffix.lower() in (".jsonl", ".json") or lines[0][1].lstrip().startswith(("{", '"'))
    return [parse_line(p, n, line) if as_json else {"instruction": line.strip(), "input": "", "system": ""}
            for n, line in lines]


def parse_line(path: Path, n: int, line: str) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise UserError(f"--sample_prompts {path}: line {n} is not JSON ({err.msg}); write one JSON object per line "
                        "such as {\"instruction\": \"...\"}, or use a .txt file with one prompt per line.") from err
    if isinstance(row, str):
        row = {"instruction": row}
    text = row.get("instruction") or row.get("prompt") if isinstance(row, dict) else None
    if not isinstance(text, str) or not text.strip():
        raise UserError(f"--sample_prompts {path}: line {n} has no non-empty \"instruction\" (or \"prompt\").")
    return {"instruction": text, "input": str(row.get("input") or ""), "system": str(row.get("system") or "")}


def as_prompt_rows(prompts) -> list[dict]:
    rows = [{"instruction": p} if isinstance(p, str) else dict(p) for p in (prompts or DEFAULT_PROMPTS)]
    return [{"instruction": r["instruction"], "input": r.get("input") or "", "system": r.get("system") or ""}
            for r in rows]


@functools.cache
def _callback_class():
    from transformers import TrainerCallback

    return type("SampleCallback", (Sampler, TrainerCallback), {})


def SampleCallback(prompts, template, tokenizer, max_new_tokens: int = 128, path=FILE, system: str = "", modes=None):
    """A transformers TrainerCallback (a Sampler), made here so that importing this module imports no transformers:
    Unsloth must be imported first."""
    return _callback_class()(prompts, template, tokenizer, max_new_tokens, path, system, modes)


class Sampler:
    """Answers `prompts` (strings or {"instruction", "input", "system"}; the built-in Korean ones when empty) with
    the model being trained, greedily, at each save and eval step and at the end of training; appends one JSON line
    per prompt to `path` (a samples.jsonl, or the run folder). Attach it with add_to(trainer), which also lets it
    write to the trainer's tensorboard and wandb loggers. `modes`: (to_inference, to_training) functions of the
    model for a backend that must switch modes to generate (Unsloth); default eval() and train()."""

    def __init__(self, prompts, template, tokenizer, max_new_tokens: int = 128, path=FILE, system: str = "",
                 modes=None):
        self.prompts, self.template, self.tok = as_prompt_rows(prompts), template, tokenizer
        self.max_new_tokens, self.system, self.modes = max_new_tokens, system, modes
        path = Path(path)
        self.path = path if path.suffix == ".jsonl" else path / FILE  # a file, or the run folder (made or not)
        self.handler, self.last_step = None, None
        if template.kind != "chat" and (system or any(p["system"] for p in self.prompts)):  # fail now, not mid-run
            raise UserError(f"a system prompt for the samples needs a chat template; this run's {template.name!r} "
                            "has none: drop \"system\" from --sample_prompts.")

    def add_to(self, trainer):
        trainer.add_callback(self)
        self.handler = trainer.callback_handler  # its tensorboard / wandb callbacks hold the open loggers
        return self

    def on_train_begin(self, args, state, control, **kwargs):
        """A resumed run answers again from its checkpoint's step: drop the rounds past it, as metrics.jsonl does."""
        if state.is_world_process_zero and self.path.is_file():
            kept = [r for r in read(self.path) if r["step"] <= state.global_step]
            self.path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept), encoding="utf-8")

    def on_save(self, args, state, control, model=None, **kwargs):
        self.sample(args, state, model)

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        self.sample(args, state, model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.sample(args, state, model)

    def sample(self, args, state, model):
        """One round, once per step (a save and an eval at the same step share it), on the main process only."""
        if model is None or not state.is_world_process_zero or state.global_step == self.last_step:
            return []
        self.last_step = state.global_step
        rows = self.answer(model, state.global_step)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        self.report(args, state.global_step, rows)
        stopped = sum(r["stopped"] for r in rows)
        log.info("samples at step %d: %d of %d answers stopped%s (%s)", state.global_step, stopped, len(rows),
                 "" if stopped == len(rows) else f" (the others ran to {self.max_new_tokens} tokens)", self.path)
        return rows

    def answer(self, model, step: int) -> list[dict]:
        import torch
        from transformers import GenerationConfig

        kwargs = stopping.generate_kwargs(self.tok, self.template, getattr(model, "generation_config", None))
        # A fresh config: greedy whatever the model's own says (an Instruct model's samples at temperature 0.6), and
        # with the KV cache, which gradient checkpointing turns off for training.
        config = GenerationConfig(max_new_tokens=self.max_new_tokens, do_sample=False, use_cache=True,
                                  eos_token_id=kwargs.pop("eos_token_id"), pad_token_id=kwargs.pop("pad_token_id"))
        training = model.training
        (self.modes[0] if self.modes else lambda m: m.eval())(model)
        rows = []
        try:
            device = next(model.parameters()).device
            for p in self.prompts:
                ids = templates.prompt_ids(self.tok, self.template, p["instruction"], p["input"],
                                           system=p["system"] or self.system)
                x = torch.tensor([ids], device=device)
                with torch.no_grad():
                    out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), generation_config=config,
                                         **kwargs)
                text, stopped, tokens = stopping.cut_answer(self.tok, self.template, out[0, len(ids):].tolist(),
                                                        config.eos_token_id)
                prompt = p["instruction"] + (f"\n\n{p['input']}" if p["input"].strip() else "")
                rows.append({"step": step, "prompt": prompt, "answer": text, "stopped": stopped, "tokens": tokens})
        finally:
            if training:
                (self.modes[1] if self.modes else lambda m: m.train())(model)
        return rows

    def report(self, args, step: int, rows: list[dict]):
        """To the trainer's own tensorboard writer and wandb run, where the run reports to them."""
        for cb in self.handler.callbacks if self.handler else []:
            kind = type(cb).__name__
            if kind == "TensorBoardCallback" and getattr(cb, "tb_writer", None) is not None:
                for i, r in enumerate(rows):
                    cb.tb_writer.add_text(f"samples/{i}", as_markdown(r), step)
                cb.tb_writer.flush()
            elif kind == "WandbCallback" and getattr(getattr(cb, "_wandb", None), "run", None) is not None:
                table = cb._wandb.Table(columns=["step", "prompt", "answer", "stopped", "tokens"],
                                        data=[[r["step"], r["prompt"], r["answer"], r["stopped"], r["tokens"]]
                                              for r in rows])
                cb._wandb.log({"samples": table, "train/global_step": step})


def as_markdown(row: dict) -> str:
    end = "stopped" if row["stopped"] else "no stop"
    return f"**{row['prompt']}**\n\n{row['answer']}\n\n_({row['tokens']} tokens, {end})_"


def read(path: Path) -> list[dict]:
    """The rows of a samples.jsonl; a line cut short by an interrupted write is skipped."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return [r for r in rows if isinstance(r, dict) and isinstance(r.get("step"), int)]


def last_samples(run_dir) -> list[dict]:
    """The answers of the last step in the run's samples.jsonl ([] where there are none)."""
    path = Path(run_dir) / FILE
    rows = read(path) if path.is_file() else []
    last = max((r["step"] for r in rows), default=None)
    return [r for r in rows if r["step"] == last]


def summary(rows: list[dict], width: int = 300) -> list[str]:
    """Lines for memory_report.py show: each prompt, its answer (cut at `width` characters) and whether it stopped."""
    if not rows:
        return []
    out = [f"samples at step {rows[0]['step']} (greedy):"]
    for r in rows:
        answer = r["answer"] if len(r["answer"]) <= width else r["answer"][:width] + "..."
        end = "stopped" if r["stopped"] else f"did NOT stop within {r['tokens']} tokens"
        out += [f"  Q: {r['prompt']}", f"  A: {answer}", f"     ({end})"]
    return out
