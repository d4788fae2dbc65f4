"""Prompt templates: data files in prompts/ next to the code, found by name, rendered, and split.

Two kinds: `NAME.json` instruction templates (Alpaca style: `prompt_input`, `prompt_no_input`,
`response_split`, with `{field}` slots filled from the data set's columns) and `NAME.jinja` chat templates
(a Jinja chat template whose first line is `{#- stop: TOKEN -#}`, the text that ends an assistant turn).
"""

import json
import re
import string
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError

PROMPTS_DIR = Path(__file__).resolve().parent.parent / "prompts"  # beside the code, whatever the working folder


@dataclass
class Template:
    name: str
    kind: str  # "instruction" or "chat"
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


def load(name: str) -> Template:
    """A template by name (a file in prompts/) or by path to a .json / .jinja file."""
    path = Path(name).expanduser()
    if not path.is_file():
        matches = [PROMPTS_DIR / f"{name}{ext}" for ext in (".json", ".jinja")]
        matches = [p for p in matches if p.is_file()]
        if not matches:
            raise UserError(f"prompt template {name!r} not found. Available in {PROMPTS_DIR}: "
                            f"{', '.join(available())}; or pass a path to a .json or .jinja file.")
        path = matches[0]
    return from_text(path.stem, path.read_text(encoding="utf-8"), chat=path.suffix == ".jinja", source=str(path))


def from_text(name: str, text: str, chat: bool, source: str = "") -> Template:
    """Rebuilds a template from its text (as saved in run.json). source: the file it came from, for errors."""
    where = f"{'chat' if chat else 'prompt'} template {name!r}" + (f" ({source})" if source else "")
    if chat:
        m = re.match(r"\{#-?\s*stop:\s*(\S+)\s*-?#\}", text)
        if not m:
            raise UserError(f"{where} must start with a line like '{{#- stop: <|eot_id|> -#}}' "
                            "naming the text that ends an assistant turn.")
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


def render(t: Template, row: dict) -> str:
    """The prompt for one row, up to and including the response heading. Values are inserted literally:
    braces inside the data are never read as slots."""
    has_input = bool(str(row.get("input") or "").strip())
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
