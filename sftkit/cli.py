"""Command-line glue shared by the scripts: Fire, log format, and clean exits on bad input."""

import logging
import sys

from .errors import UserError


def run_cli(fn):
    """Runs `fn` (a function, or a dict of command name -> function) through Fire; a UserError becomes one
    clear line on stderr and exit status 2."""
    import fire

    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s", stream=sys.stderr)
    try:
        fire.Fire({name: typed(f) for name, f in fn.items()} if isinstance(fn, dict) else typed(fn))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def typed(fn):
    """Fire reads "hi, there" as a tuple and "2024" as an int; a parameter typed str gets the text as typed,
    and one typed int or float is converted here, so `--r abc` is a clear error, not a crash deep inside."""
    import inspect

    from fire.decorators import SetParseFns

    if not inspect.isfunction(fn):
        return fn
    params = inspect.signature(fn).parameters.items()
    return SetParseFns(**{name: str if p.annotation is str else number(name, p.annotation)
                          for name, p in params if p.annotation in (str, int, float)})(fn)


def number(name: str, kind: type):
    """A Fire parse function for an int or float argument that fails with the argument's name and the fix."""
    def parse(text):
        try:
            return kind(text)
        except ValueError:
            raise UserError(f"--{name} expects {'a whole number' if kind is int else 'a number'}, got {text!r}.") \
                from None
    return parse
