"""Command-line glue shared by the scripts: strict flags, help from the docstring, Fire, one-line errors.

Fire leaves a mistyped flag unconsumed and complains only after the function has run (a `--max_step 2` trained
the default 60 steps). So the command line is checked against the function's signature first: an unknown flag
is an error before anything runs, naming the closest known one. The function then receives only the arguments
that were typed, as a Python caller's keywords would be, so "--max_steps 60" is known from no --max_steps at all.
"""

import contextlib
import difflib
import inspect
import logging
import math
import re
import sys

from .errors import Stopped, UserError

TRUE, FALSE = {"true", "yes", "y", "on", "1"}, {"false", "no", "n", "off", "0"}


def names(value) -> list:
    """Comma-separated text (as typed on the command line), a list or tuple (from Python, or from Fire, which
    hands `512,2048` over as a tuple of ints) or a lone value -> the items as stripped strings, empty entries
    dropped: 'q_proj, v_proj,' == ['q_proj', 'v_proj'], 2048 == ['2048'], None == []."""
    items = value if isinstance(value, (tuple, list)) else ("" if value is None else str(value)).split(",")
    return [str(x).strip() for x in items if str(x).strip()]


def run_cli(fn, argv=None):
    """Runs `fn` (a function, or a dict of command name -> function) from the command line. A UserError becomes
    one line on stderr and exit status 2; Ctrl-C one line and 130; a training stopped by a signal (after saving) 130
    or 143."""
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s", stream=sys.stderr)
    try:
        positional = isinstance(fn, dict)  # memory_report.py show RUN; train and infer take flags only
        if positional:
            name, fn, argv = command_of(fn, argv)
            prog = f"{sys.argv[0]} {name}"
        else:
            prog = sys.argv[0]
        if {"-h", "--help", "-help"} & set(argv):
            print(help_text(fn, prog))
            return
        given = check_flags(fn, argv, positional)
        quiet_libraries()
        import fire

        fire.Fire(typed(only_given(fn, given)), command=argv, name=prog)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except Stopped as err:
        print(f"stopped: {err}", file=sys.stderr)
        sys.exit(err.code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def quiet_libraries():
    """Silences what a user cannot act on: import-time deprecation notes from torch's pytree registry, bitsandbytes'
    CPU kernel hint, the tokenizer's and the data sets' per-map progress bars. The backend line, the training
    progress bar, the report and the warnings that matter (errors) stay."""
    import torch  # noqa: F401  (configures its loggers first; the levels set below must come after)

    for name in ("torch.utils._pytree", "bitsandbytes", "datasets", "transformers.tokenization_utils_base"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # A resumed run's skipped batches made accelerate say this once per logged step (11-16 lines per resume);
    # it is about metric gathering, which training does not use.
    logging.getLogger("accelerate.accelerator").addFilter(lambda r: "had no length" not in r.getMessage())
    import datasets
    import transformers

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    transformers.logging.set_verbosity_error()  # its progress bars stay: the Trainer's is one of them


@contextlib.contextmanager
def without_warning(logger: str, text: str):
    """Drops a library's log records that contain `text` while the block runs (one known not to apply)."""
    def keep(record):
        return text not in record.getMessage()

    logging.getLogger(logger).addFilter(keep)
    try:
        yield
    finally:
        logging.getLogger(logger).removeFilter(keep)


def command_of(commands: dict, argv: list):
    """memory_report.py's subcommands: the first word names one (a default is the caller's business)."""
    if not argv or argv[0].startswith("-"):
        if {"-h", "--help", "-help"} & set(argv):
            print("commands: " + ", ".join(commands) + "\n\n" + "\n".join(
                f"  {n:<10}{(inspect.getdoc(f) or '').splitlines()[0]}" for n, f in commands.items()))
            raise SystemExit(0)
        raise UserError(f"name a command: {', '.join(commands)}.")
    name = argv[0]
    if name not in commands:
        close = difflib.get_close_matches(name, list(commands), n=1)
        raise UserError(f"unknown command {name!r}" + (f"; did you mean {close[0]!r}?" if close else "")
                        + f" Commands: {', '.join(commands)}.")
    return name, commands[name], argv[1:]


def params(fn) -> dict:
    return {n: p for n, p in inspect.signature(fn).parameters.items()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def check_flags(fn, argv: list, positional_ok: bool = True) -> set:
    """The names typed (flags, and parameters filled by position); an unknown flag is a UserError naming the
    closest known one, and so is a value without a flag where the command takes none by position."""
    known = params(fn)
    given, positional, i = set(), 0, 0
    while i < len(argv):
        token = argv[i]
        if token.startswith("--") and len(token) > 2:
            flag, has_value = token[2:].split("=", 1)[0].replace("-", "_"), "=" in token
            name = flag
            if name not in known and name.startswith("no") and known.get(name[2:]) is not None \
                    and known[name[2:]].annotation is bool:
                name = name[2:]  # Fire's --noflag
            if name not in known:
                close = difflib.get_close_matches(flag, list(known), n=1, cutoff=0.6)
                hint = (f"; did you mean --{close[0]}?" if close else f". Known flags: --{', --'.join(known)}."
                        if known else ": this command takes no flags, only its values.")
                raise UserError(f"unknown flag --{flag}{hint} Nothing was run (--help lists every flag).")
            given.add(name)
            takes_value = not has_value and i + 1 < len(argv) and not argv[i + 1].startswith("--")
            if known[name].annotation is bool and takes_value and argv[i + 1].lower() not in TRUE | FALSE:
                if not positional_ok:  # `--packing maybe`: name the switch, not the stray word
                    raise UserError(f"--{name} is a switch: give it alone (on), as --{name} True / False, or "
                                    f"--no{name}; {argv[i + 1]!r} is neither.")
                takes_value = False  # `--chat prompts.txt` is a switch and a stray word, as Fire reads it
            if known[name].annotation is not bool and not has_value and not takes_value and name == flag:
                raise UserError(f"--{name} needs a value (--{name} VALUE); Fire would have passed the text 'True'.")
            i += 2 if takes_value else 1
            continue
        if len(token) > 1 and token[0] == "-" and token[1].isalpha():  # Fire's -r 8: written --r 8 here
            name = token[1:].split("=", 1)[0]
            raise UserError(f"{token!r}: write flags with two dashes, --{name if name in known else 'FLAG'} VALUE "
                            "(--help lists them). Nothing was run.")
        if not positional_ok:
            raise UserError(f"{token!r} has no flag in front of it: every argument is given as --FLAG VALUE "
                            "(--help lists them). Quote a value that holds spaces.")
        positional += 1
        i += 1
    order = [n for n, p in known.items() if p.kind == p.POSITIONAL_OR_KEYWORD]
    star = any(p.kind == p.VAR_POSITIONAL for p in inspect.signature(fn).parameters.values())
    if positional > len(order) and not star:
        raise UserError(f"{positional} value(s) without a flag; this command takes flags such as --{order[0]} "
                        "VALUE (--help lists them)." if order else "this command takes no values.")
    return given | set(order[:positional])


def only_given(fn, given: set):
    """A wrapper Fire can call with every argument filled in; `fn` receives only the typed ones."""
    sig = inspect.signature(fn)
    if any(p.kind == p.VAR_POSITIONAL for p in sig.parameters.values()):
        def call(*args, **kwargs):
            fn(*args, **kwargs)  # Fire would print the return value: the commands print their own output
    else:
        def call(*args, **kwargs):
            bound = sig.bind(*args, **kwargs).arguments
            fn(**{k: v for k, v in bound.items() if k in given})
    call.__signature__ = sig
    call.__doc__, call.__name__ = fn.__doc__, fn.__name__
    return call


def help_text(fn, prog: str) -> str:
    """Usage and one line per argument, from the signature and the docstring's Args section."""
    doc = inspect.getdoc(fn) or ""
    head, _, args_part = doc.partition("Args:")
    described = dict(re.findall(r"^\s*(\w+):\s*(.+)$", args_part, flags=re.M))
    lines = [f"usage: {prog} [--FLAG VALUE ...]", "", head.strip(), "", "flags:"]
    for name, p in params(fn).items():
        default = "" if p.default is inspect.Parameter.empty else f" (default: {p.default!r})"
        kind = getattr(p.annotation, "__name__", "")
        lines.append(f"  --{name} {kind.upper()}{default}\n      {described.get(name, '')}")
    return "\n".join(lines)


def typed(fn):
    """Parse functions for every named argument of `fn`, read by its annotation where Fire's own reading
    surprises: "hi, there" would be a tuple and "2024" an int for a str argument, `--packing false` the truthy
    text 'false', and `--r abc` a crash deep inside."""
    from fire.decorators import SetParseFns

    return SetParseFns(**{name: parser(name, p.annotation) for name, p in params(fn).items()})(fn)


def parser(name: str, kind):
    def parse(text):
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
