"""Command-line glue shared by the scripts: Fire, log format, and clean exits on bad input."""

import logging
import math
import sys

from .errors import UserError

# Names of the arguments typed on the command line, collected while run_cli runs (None outside it). Fire calls
# a function with every argument, defaults filled in, so only its parse functions see what the user typed;
# run.resumable needs that to tell "--max_steps 60" from no --max_steps at all.
GIVEN = None
TRUE, FALSE = {"true", "yes", "y", "on", "1"}, {"false", "no", "n", "off", "0"}


def names(value) -> list:
    """Comma-separated text (as typed on the command line), a list or tuple (from Python, or from Fire, which
    hands `512,2048` over as a tuple of ints) or a lone value -> the items as stripped strings, empty entries
    dropped: 'q_proj, v_proj,' == ['q_proj', 'v_proj'], 2048 == ['2048'], None == []."""
    items = value if isinstance(value, (tuple, list)) else ("" if value is None else str(value)).split(",")
    return [str(x).strip() for x in items if str(x).strip()]


def run_cli(fn):
    """Runs `fn` (a function, or a dict of command name -> function) through Fire; a UserError becomes one
    clear line on stderr and exit status 2."""
    import fire

    global GIVEN
    GIVEN = set()
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s", stream=sys.stderr)
    try:
        fire.Fire({name: typed(f) for name, f in fn.items()} if isinstance(fn, dict) else typed(fn))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def typed(fn):
    """Parse functions for every named argument of `fn`: they note that it was typed (GIVEN) and read it by its
    annotation, where Fire's own reading surprises: "hi, there" would be a tuple and "2024" an int for a str
    argument, `--packing false` the truthy text 'false', and `--r abc` a crash deep inside."""
    import inspect

    from fire.decorators import SetParseFns

    if not inspect.isfunction(fn):
        return fn
    named = [(n, p.annotation) for n, p in inspect.signature(fn).parameters.items()
             if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return SetParseFns(**{name: parser(name, kind) for name, kind in named})(fn)


def parser(name: str, kind):
    def parse(text):
        if GIVEN is not None:
            GIVEN.add(name)
        if kind is str:
            return text
        if kind is bool:
            return boolean(name, text)
        if kind in (int, float):
            return number(name, kind, text)
        from fire.parser import DefaultParseValue

        return DefaultParseValue(text)
    return parse


def boolean(name: str, text) -> bool:
    word = str(text).strip().lower()
    if word in TRUE | FALSE:
        return word in TRUE
    raise UserError(f"--{name} is a switch: give True or False (or leave the value out for True), got {text!r}.")


def number(name: str, kind: type, text):
    """An int or float argument, or a UserError with the argument's name and what was typed."""
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or (kind is float and not math.isfinite(value)):
        raise UserError(f"--{name} expects {'a whole number' if kind is int else 'a number'}, got {text!r}.")
    return value
