"""An Ollama Modelfile beside the GGUF, built from the run's own template, so Ollama prompts the model as training did.

A chat TEMPLATE renders the whole conversation at once from .Messages (and .System): Ollama does so for any
template that names .Messages. Its older way fills .System, .Prompt and .Response once per exchange and drops
everything from {{ .Response }} on for the exchange being answered; that repeats whatever opens the conversation
(Llama 3.1 Instruct's default system block) before every turn, so it is only the fallback branch. An instruction
template is one exchange, written that older way. Ollama adds BOS itself when the GGUF says the tokenizer does
(Llama 3 does), so the TEMPLATE leaves it out.
"""

import logging
import re
import shlex
import string
from pathlib import Path

from .errors import UserError

log = logging.getLogger("sftkit")

# infer.py decodes greedily by default: temperature 0 gives the same answers. Ollama's repeat_penalty defaults to
# 1.1, infer.py's repetition_penalty to 1.0.
PARAMETERS = {"temperature": 0, "repeat_penalty": 1.0}
SYSTEM_MARK, PROMPT_MARK, ANSWER_MARK = "\x01SYSTEM\x01", "\x01PROMPT\x01", "\x01ANSWER\x01"
FIRST_MARK = "\x01FIRST\x01"  # the first user turn of a two-turn rendering


def _go_literal(text: str) -> str:
    """Text written as-is by a Go template: only `{{` starts an action, so it is written as an action printing it."""
    return text.replace("{{", '{{ "{{" }}')


def instruction_template(template, eos_token: str) -> str:
    """TEMPLATE for an Alpaca-style template: its no-input prompt with the user's message as {instruction}, then
    the answer and EOS, as each training row ended."""
    fmt = template.data["prompt_no_input"]
    out = []
    for literal, field, _, _ in string.Formatter().parse(fmt):
        out.append(_go_literal(literal))
        if field is None:
            continue
        if field != "instruction":
            raise UserError(f"template {template.name!r} fills {{{field}}}, which an Ollama message cannot give (it "
                            "has one text, the prompt): write the Modelfile's TEMPLATE by hand, or export with a "
                            "template whose no-input prompt uses only {instruction}.")
        out.append("{{ .Prompt }}")
    return "".join(out) + "{{ .Response }}" + _go_literal(eos_token)


def _common_prefix(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def chat_template(tokenizer, template) -> str:
    """TEMPLATE for a Jinja chat template, read off its own renderings: a user turn with the generation prompt
    (with and without a system turn before it) and a finished answer. Works for templates whose turns are
    concatenated text (Llama 3.1, ChatML); one whose user turn changes with a system prompt (e.g. one that writes
    a default system prompt) is refused."""
    def render(messages, add_generation_prompt=True):
        return tokenizer.apply_chat_template(messages, chat_template=template.text, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)

    user = {"role": "user", "content": PROMPT_MARK}
    plain = render([user])
    with_system = render([{"role": "system", "content": SYSTEM_MARK}, user])
    answered = render([user, {"role": "assistant", "content": ANSWER_MARK}], add_generation_prompt=False)
    bos = tokenizer.bos_token or ""
    if PROMPT_MARK not in plain or SYSTEM_MARK in plain:
        raise UserError(f"chat template {template.name!r} cannot be turned into an Ollama TEMPLATE automatically: "
                        "write the Modelfile's TEMPLATE by hand.")
    # The system turn sits between the opening (BOS or nothing) and the user turn; failing that, split at the
    # longest shared start (right, though it may cut a turn's opening marker in two).
    start = _common_prefix(plain, with_system)
    for head in [h for h in (bos, "") if plain.startswith(h) and with_system.startswith(h)]:
        cut = len(with_system) - len(plain) + len(head)
        if with_system.endswith(plain[len(head):]) and SYSTEM_MARK in with_system[len(head):cut]:
            start = len(head)
            break
    end = len(with_system) - (len(plain) - start)
    system_block = with_system[start:end] if SYSTEM_MARK in with_system[start:end] else ""
    if with_system[end:] != plain[start:]:
        raise UserError(f"chat template {template.name!r} changes the user turn when a system prompt is given: "
                        "write the Modelfile's TEMPLATE by hand.")
    after_answer = answered.split(ANSWER_MARK, 1)[1] if ANSWER_MARK in answered else template.stop
    head = plain[:start]
    if bos and head.startswith(bos):
        head = head[len(bos):]  # Ollama's tokenizer adds it
    opening = [_go_literal(head)]
    if system_block:
        s_before, s_after = system_block.split(SYSTEM_MARK, 1)
        opening += ["{{ if .System }}", _go_literal(s_before), "{{ .System }}", _go_literal(s_after), "{{ end }}"]
    p_before, p_after = plain[start:].split(PROMPT_MARK, 1)
    legacy = "".join(opening + [_go_literal(p_before), "{{ .Prompt }}", _go_literal(p_after), "{{ .Response }}",
                                _go_literal(after_answer)])
    if bos and not plain.startswith(bos) and tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]:
        log.warning("chat template %r writes no %s, but this tokenizer (so Ollama) puts one in front of every "
                    "prompt: Ollama's prompts start with a token the training rows did not have", template.name, bos)
    # A later user turn opens with less than the first (Llama 3.1: the system block's <|eot_id|> closes before the
    # first user header): read the later turn's opening off a two-turn rendering, and check the whole of it.
    two = render([{"role": "user", "content": FIRST_MARK}, {"role": "assistant", "content": ANSWER_MARK},
                  {"role": "user", "content": PROMPT_MARK}])
    between = two.split(ANSWER_MARK, 1)[1].split(PROMPT_MARK, 1)[0] if ANSWER_MARK in two else ""
    turn = between[len(after_answer):] if between.startswith(after_answer) else None
    if turn is None or not p_before.endswith(turn) or two != plain[:start] + p_before + FIRST_MARK + p_after + \
            ANSWER_MARK + after_answer + turn + PROMPT_MARK + p_after:
        log.warning("chat template %r: its later turns could not be read off its renderings, so the Modelfile "
                    "renders one exchange at a time (multi-turn Ollama chats may differ from training)",
                    template.name)
        return legacy
    turns = ['{{ range .Messages }}{{ if eq .Role "user" }}', _go_literal(turn), "{{ .Content }}",
             _go_literal(p_after), '{{ else if eq .Role "assistant" }}{{ .Content }}', _go_literal(after_answer),
             "{{ end }}{{ end }}"]
    return "".join(["{{ if .Messages }}", *opening, _go_literal(p_before[:len(p_before) - len(turn)]), *turns,
                    "{{ else }}", legacy, "{{ end }}"])


def stop_tokens(template, eos_token: str) -> list[str]:
    """Texts that end an answer: the template's end of turn (chat) and the tokenizer's EOS."""
    stops = [template.stop] if template.kind == "chat" and template.stop else []
    return stops + [t for t in [eos_token] if t and t not in stops]


def build(gguf_file: str, template, tokenizer, num_ctx: int = 0, system: str = "", parameters: dict | None = None,
          name: str = "") -> str:
    """The Modelfile's text. gguf_file: the GGUF's path relative to the Modelfile (usually its file name);
    name: the Ollama model name its header comment uses in the commands."""
    body = (chat_template(tokenizer, template) if template.kind == "chat"
            else instruction_template(template, tokenizer.eos_token or ""))
    if '"""' in body or '"""' in system:
        raise UserError('the template or system prompt contains """, which ends a Modelfile block: remove it.')
    name = name or "NAME"
    lines = [f"# Ollama Modelfile written by sftkit from the run's template {template.name!r}. In this folder:",
             f"#   ollama create {name} -f Modelfile", f'#   ollama run {name} "<your instruction>"',
             f"FROM ./{gguf_file}", f'TEMPLATE """{body}"""']
    if system:
        lines.append(f'SYSTEM """{system}"""')
    for stop in stop_tokens(template, tokenizer.eos_token or ""):
        lines.append(f'PARAMETER stop "{stop}"')
    params = {**PARAMETERS, **({"num_ctx": num_ctx} if num_ctx else {}), **(parameters or {})}
    lines += [f"PARAMETER {k} {v}" for k, v in params.items()]
    return "\n".join(lines) + "\n"


def ollama_name(run_dir: str) -> str:
    """A model name Ollama accepts (lowercase letters, digits, - _ .), from the run folder's name."""
    name = re.sub(r"[^a-z0-9._-]+", "-", Path(run_dir).resolve().name.lower()).strip("-._")
    return name or "sftkit-model"


def write(gguf_path: str, template, tokenizer, run_dir: str = "", num_ctx: int = 0, system: str = "") -> dict:
    """Writes `Modelfile` next to the GGUF. Returns its path and the `ollama create` / `ollama run` commands."""
    gguf = Path(gguf_path)
    path = gguf.parent / "Modelfile"
    name = ollama_name(run_dir or str(gguf.parent.parent))
    path.write_text(build(gguf.name, template, tokenizer, num_ctx, system, name=name), encoding="utf-8")
    return {"path": str(path), "name": name,
            "create": f"cd {shlex.quote(str(gguf.parent))} && ollama create {name} -f Modelfile",
            "run": f"ollama run {name} \"<your instruction>\""}


def read_modelfile(text: str) -> dict:
    """The TEMPLATE, SYSTEM, FROM and PARAMETERs of a Modelfile written by build() (for tests and checks)."""
    out = {"parameters": []}
    for key, value in re.findall(r'^(TEMPLATE|SYSTEM) """(.*?)"""', text, re.S | re.M):
        out[key.lower()] = value
    out["from"] = re.search(r"^FROM (.+)$", text, re.M).group(1)
    out["parameters"] = re.findall(r"^PARAMETER (\S+) (.+)$", text, re.M)
    return out
