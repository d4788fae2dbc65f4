"""Command-line glue shared by the scripts: Fire, log format, and clean exits on bad input."""

import logging
import sys

from .errors import UserError


def run_cli(fn):
    """Runs `fn` through Fire; a UserError becomes one clear line on stderr and exit status 2."""
    import fire

    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s", stream=sys.stderr)
    try:
        fire.Fire(fn)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
