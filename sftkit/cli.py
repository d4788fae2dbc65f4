"""Command-line glue shared by the scripts: Fire, log format, and clean exits on bad input."""

import logging
import sys

from .errors import UserError


def run_cli(fn):
    """Runs `fn` through Fire; a UserError becomes one clear line on stderr and exit status 2."""
    import fire

    import inspect

    from fire.decorators import SetParseFns

    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s", stream=sys.stderr)
    if inspect.isfunction(fn):
        # Fire reads "hi, there" as a tuple and "2024" as an int; a parameter typed str gets the text as typed.
        fn = SetParseFns(**{name: str for name, p in inspect.signature(fn).parameters.items()
                            if p.annotation is str})(fn)
    try:
        fire.Fire(fn)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
