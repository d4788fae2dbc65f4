"""Prompt templates: data files in prompts/ next to the code, or the model's own chat template; chosen for the data
(`--prompt auto`), rendered, and split.

Three kinds: `NAME.json` instruction templates (Alpaca style: `prompt_input`, `prompt_no_input`,
`response_split`, with `{field}` slots filled from the data set's columns), `NAME.jinja` chat templates (a Jinja
chat template whose first line is `{#- stop: TOKEN -#}`, the text that ends an assistant turn) and "text" (raw
text, trained as written: no template).
"""

import datetime
import functools
import json
import re
import string
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.sandbox

from .errors import UserError

PROMPTS_DIR = Path(__file__).resolve().parent.parent / "prompts"  # beside the code, whatever the working folder
AUTO, OWN, NONE = "auto", "own", "none"  # --prompt values that name no file
BUILTIN_CHAT = ("llama-3.1-chat", "chatml")  # for a model without a chat template: the first whose stop is one token
STOP_LINE = re.compile(r"\{#-?\s*stop:\s*(\S+)\s*-?#\}\n?")
TAGS = re.compile(r"\{%-?\s*generation\s*-?%\}")
ANSWER = "output"  # the field an instruction row's answer comes from (data.read_rows; --columns maps onto it)


@dataclass
class Template:
    name: str
    kind: str  # "instruction", "chat" or "text"
    text: str  # the file's content, saved in run.json so inference uses exactly this template
    data: dict = field(default_factory=dict)  # instruction templates: the parsed JSON
    stop: str = ""  # chat templates: the text that ends an assistant turn

    @property
    def fields(self) -> set:
        """The `{field}` slots of an instruction template."""
        names = set()
        for key in ("prompt_input", "prompt_no_input"):
            names |= {f for f in slots(self.data.get(key, "")) if f}
        return names


def slots(fmt: str) -> list:
    """The field names of a format string, "" for a bare `{}`. Raises ValueError on a stray brace."""
    return [f for _, f, _, _ in string.Formatter().parse(fmt) if f is not None]


def positional(name: str) -> bool:
    """`{}`, `{0}`, `{0.x}`, `{[1]}`: format_map only fills named slots, so these fail when rendering."""
    return re.match(r"\d*(?=[.\[]|$)", name) is not None


def available() -> list[str]:
    return sorted(p.stem for p in PROMPTS_DIR.iterdir() if p.suffix in (".json", ".jinja"))


def text_template() -> Template:
    """Raw text data: rows are trained as written, and a prompt at inference is continued as written."""
    return Template(NONE, "text", "")


def load(name: str) -> Template:
    """A template by name (a file in prompts/, or `none` for raw text) or by path to a .json / .jinja file."""
    if name == NONE:
        return text_template()
    if name in (AUTO, OWN):  # these need the data and the tokenizer: choose() resolves them
        raise UserError(f"--prompt {name} is resolved from the data and the model's tokenizer here; name a template "
                        f"instead ({', '.join(available())}) or a path to a .json or .jinja file.")
    path = Path(name).expanduser()
    if not path.is_file():
        matches = [PROMPTS_DIR / f"{name}{ext}" for ext in (".json", ".jinja")]
        matches = [p for p in matches if p.is_file()]
        if not matches:
            raise UserError(f"prompt template {name!r} not found. Available in {PROMPTS_DIR}: "
                            f"{', '.join(available())}, or auto, own, none; or pass a path to a .json or .jinja file.")
        path = matches[0]
    t = from_text(path.stem, path.read_text(encoding="utf-8"), chat=path.suffix == ".jinja", source=str(path))
    # Here, where a template is picked for training, not in from_text: a finished run's recorded template is used
    # as it was trained, and a model's own template (a run's "own") is its format, not something to correct.
    where = f"{'chat' if t.kind == 'chat' else 'prompt'} template {t.name!r} ({path})"
    if t.kind == "chat":
        from .own_template import check_turns_kept  # there: it builds on this module's rendering

        check_turns_kept(t, where)
    else:
        check_slots(t, where)
    return t


def from_text(name: str, text: str, chat, source: str = "") -> Template:
    """Rebuilds a template from its text (as saved in run.json). chat: True/False, or the kind ("chat",
    "instruction", "text"). source: the file it came from, for errors."""
    if chat == "text" or (chat is False and name == NONE and not text.strip()):
        return text_template()
    chat = chat is True or chat == "chat"
    where = f"{'chat' if chat else 'prompt'} template {name!r}" + (f" ({source})" if source else "")
    if chat:
        m = STOP_LINE.match(text)
        if not m:
            raise UserError(f"{where} must start with a line like '{{#- stop: <|eot_id|> -#}}' "
                            "naming the text that ends an assistant turn.")
        try:  # now, not when the first row is rendered after the model has loaded
            compiled(text)
        except jinja2.TemplateSyntaxError as err:
            raise UserError(f"{where} has a Jinja syntax error at line {err.lineno}: {err.message}. Fix that line: "
                            "each {{ closes with }}, each {% with %}, and each {% for %} / {% if %} / "
                            "{% generation %} needs its {% endfor %} / {% endif %} / {% endgeneration %} "
                            "(prompts/chatml.jinja is a working example).") from err
        return Template(name, "chat", text, stop=m.group(1))
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{where} is not valid JSON: {err}") from err
    missing = {"prompt_input", "prompt_no_input"} - set(data)
    if missing:
        raise UserError(f"{where} lacks {sorted(missing)}; see prompts/README.md for the keys.")
    for key in ("prompt_input", "prompt_no_input"):
        if not isinstance(data[key], str):
            raise UserError(f"{where}: {key} must be a string with {{field}} slots, not {data[key]!r}.")
        try:
            bad = [f for f in slots(data[key]) if positional(f)]
        except ValueError as err:  # a stray brace
            raise UserError(f"{where} has a malformed slot in {key} ({err}). Write a literal brace as "
                            "{{ or }}.") from err
        if bad:  # caught here, at load time, rather than as a ValueError at the first rendered row
            raise UserError(f"{where} has a positional slot {{{bad[0]}}} in {key}; slots must name a data-set "
                            "column, e.g. {instruction} or {input}. Write a literal brace as {{ or }}.")
    return Template(name, "instruction", text, data=data)


def check_slots(t: Template, where: str):
    """An instruction template file's slots as training reads them: the answer is appended after the prompt, so a
    prompt that holds it teaches the model to copy; prompt_input is the prompt of every row with an input."""
    for key in ("prompt_input", "prompt_no_input"):
        if ANSWER in {re.split(r"[.\[]", f)[0] for f in slots(t.data[key])}:
            raise UserError(f"{where}: {key} has the answer's slot {{{ANSWER}}}, so every prompt would contain its "
                            f"answer and the model would learn to copy it. Remove {{{ANSWER}}} from {key}: the "
                            "answer is appended after the prompt at training time (prompts/README.md).")


def check_inputs_kept(t: Template, rows_with_input: int):
    """prompt_input is the prompt of every row with an input: without an {input} slot those inputs would be dropped.
    Checked against the data (a Q/A set without inputs never uses prompt_input)."""
    if rows_with_input and t.kind == "instruction" and "input" not in slots(t.data["prompt_input"]):
        raise UserError(f"template {t.name!r}: prompt_input has no {{input}} slot, so the input of the "
                        f"{rows_with_input} row(s) that have one would be dropped. Add {{input}} to prompt_input, "
                        "e.g. '...### Input:\\n{input}\\n\\n### Response:\\n'.")


# --- chat templates, rendered as transformers renders them -----------------------------------------------------

class Generation(jinja2.ext.Extension):
    """The {% generation %} tag as transformers parses it (it marks assistant tokens there; here it only renders)."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def raise_exception(message):
    raise jinja2.TemplateError(message)


@functools.lru_cache(maxsize=8)
def compiled(text: str):
    """The template compiled in an environment like transformers' (chat_template_utils: sandboxed, trim_blocks,
    lstrip_blocks, loop controls, the generation tag, raise_exception, strftime_now, tojson), so what renders here
    renders there. Not transformers' own (_compile_jinja_template, private): importing it imports transformers,
    and infer.py loads the template before the backend is chosen, when Unsloth must still come first."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda f: datetime.datetime.now().strftime(f))
    return env.from_string(text)


def render_chat(text: str, conversation: list, gen: bool = False) -> str:
    """The conversation rendered without a tokenizer: its special tokens are empty strings."""
    return compiled(text).render(messages=conversation, add_generation_prompt=gen, tools=None, documents=None,
                                 **dict.fromkeys(("bos_token", "eos_token", "unk_token", "pad_token"), ""))


def refusal(text: str, conversation: list, gen: bool = False) -> str:
    """Why the template will not render this conversation (its raise_exception message, or the error); "" if it
    does."""
    try:
        render_chat(text, conversation, gen)
    except Exception as err:  # noqa: BLE001 - any failure here would fail training the same way
        return str(err) if isinstance(err, jinja2.TemplateError) else f"{type(err).__name__}: {err}"
    return ""


def render(t: Template, row: dict) -> str:
    """The prompt for one row, up to and including the response heading. Values are inserted literally:
    braces inside the data are never read as slots. A text template continues the instruction (and input)."""
    has_input = bool(str(row.get("input") or "").strip())
    if t.kind == "text":
        return str(row.get("instruction") or "") + (f"\n\n{row['input']}" if has_input else "")
    fmt = t.data["prompt_input"] if has_input else t.data["prompt_no_input"]
    unknown = {f for _, f, _, _ in string.Formatter().parse(fmt) if f} - set(row)
    if unknown:
        raise UserError(f"template {t.name!r} uses {sorted(unknown)}, which the data lacks (columns: "
                        f"{sorted(row)}). Map a column onto it with --columns 'FIELD=COLUMN', or pick another --prompt.")
    return fmt.format_map({k: "" if v is None else str(v) for k, v in row.items()})


def split_answer(t: Template, text: str) -> str:
    """The answer part of a generated text: what follows the response heading."""
    marker = t.data.get("response_split") if t.kind == "instruction" else None
    return text.split(marker, 1)[-1].strip() if marker else text.strip()


# --- choosing the template for the data ------------------------------------------------------------------------

def for_data(prompt: str, data_format: str, tokenizer=None, answers_only: bool = True) -> tuple[Template, str]:
    """(template, reason) for `--prompt` and the detected data format ("alpaca", "chat" or "text"). `auto`: Alpaca
    data keep alpaca_ko; chat data get the model's own chat template where its tokenizer has one (an Instruct
    model), else the built-in llama-3.1-chat (chatml for a ChatML vocabulary); raw text gets none. `own`: the
    model's own template. Another name loads that template. answers_only (no --train_on_inputs): chat templates
    must mark assistant turns."""
    if data_format not in ("alpaca", "chat", "text"):
        raise ValueError(f"choose() needs the detected data format, not {data_format!r}")
    model = Path(str(getattr(tokenizer, "name_or_path", "") or "the model")).name
    if prompt == OWN or (prompt == AUTO and data_format == "chat" and own_text(tokenizer)):
        from .own_template import from_tokenizer  # here: own_template builds on this module's Template

        t = from_tokenizer(tokenizer)
        if answers_only and data_format == "chat" and not TAGS.search(t.text):
            raise UserError(f"the chat template of {model} marks no assistant turns ({{% generation %}} tags) and is "
                            "not a layout sftkit or TRL can tag, so the loss cannot skip the prompts: pass "
                            "--train_on_inputs, or --prompt FILE.jinja with the tags (prompts/README.md).")
        added = "" if TAGS.search(own_text(tokenizer)) else ", its assistant turns tagged for the loss"
        how = "--prompt own" if prompt == OWN else "chat data and the tokenizer has its own chat template"
        return t, f"{how}: {model}'s own template (stop {t.stop}{added})"
    if prompt != AUTO:
        return load(prompt), f"--prompt {prompt}"
    if data_format == "alpaca":
        return load("alpaca_ko"), "Alpaca data (instruction/output): the instruction template alpaca_ko"
    if data_format == "text":
        return text_template(), "raw text: trained as written, no template"
    for name in BUILTIN_CHAT:
        t = load(name)
        if tokenizer is None or t.stop in tokenizer.get_vocab():
            return t, f"chat data and {model} has no chat template of its own (a base model): the built-in {name}"
    return load(BUILTIN_CHAT[0]), (f"chat data and {model} has no chat template of its own: the built-in "
                                   f"{BUILTIN_CHAT[0]} (its stop is several tokens in this vocabulary)")


def own_text(tokenizer) -> str:
    """The tokenizer's own chat template ("" where it has none), without a stop line sftkit put there."""
    text = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    if isinstance(text, dict):  # several named templates: the default one
        text = text.get("default")
    return STOP_LINE.sub("", text, count=1) if text and STOP_LINE.match(text) else (text or "")


def attach(tokenizer, template: Template):
    """The one place a template goes onto a tokenizer: a chat template becomes its chat_template, so that TRL
    (training), generate (inference) and the saved tokenizer all render with the same text."""
    if template.kind == "chat":
        tokenizer.chat_template = template.text
    return tokenizer


# --- prompts at inference --------------------------------------------------------------------------------------

def messages(instruction: str, input: str = "", history=None, system: str = "") -> list:
    """The conversation a chat prompt renders: the system turn (`--system`, replacing one in the history), the
    earlier turns, then the user's turn (instruction, and input after a blank line)."""
    earlier = [dict(m) for m in history or [] if not (system and m["role"] == "system")]
    turn = {"role": "user", "content": instruction + (f"\n\n{input}" if str(input or "").strip() else "")}
    return ([{"role": "system", "content": system}] if system else []) + earlier + [turn]


def prompt_ids(tokenizer, template: Template, instruction: str, input: str = "", history=None, system: str = "",
               row=None) -> list:
    """Token ids of one prompt, tokenized as TRL tokenized the training rows (the template must be attached to the
    tokenizer). row: a batch file's line, whose other keys fill an instruction template's further fields."""
    check_system(template, system)
    if template.kind == "chat":
        return list(tokenizer.apply_chat_template(messages(instruction, input, history, system), tokenize=True,
                                                  add_generation_prompt=True, return_dict=True)["input_ids"])
    return list(tokenizer(render(template, {**(row or {}), "instruction": instruction, "input": input}))["input_ids"])


def check_system(template: Template, system: str):
    """--system needs a chat template that takes a system turn: checked before the model loads."""
    if system and template.kind != "chat":
        raise UserError(f"--system needs a chat template; this run's template {template.name!r} is "
                        f"{'raw text' if template.kind == 'text' else 'an instruction template'}: put the "
                        "instruction in --instruction (and --input) instead.")
    turns = [{"role": "system", "content": system}, {"role": "user", "content": "hi"}]
    why = system and refusal(template.text, turns, gen=True)  # Gemma's and Mistral's templates raise on a system turn
    if why:
        raise UserError(f"--system: this run's chat template {template.name!r} refuses a system turn ({why}). Drop "
                        "--system (and system turns) and put the instructions in the prompt itself.")
