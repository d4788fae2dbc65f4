"""What a run's record supplies to a later command, by one rule: what the caller did not give is taken from
run.json; what it gave must match the record unless that setting may change. --resume (train()) and infer.py
--adapter both use it; memory_report.py only reads the record."""

import functools
import inspect
import json
from pathlib import Path

from .advice import continue_or_restart
from .checkpoints import readable_weights
from .cli import names
from .errors import UserError
from .runfolder import RunFolder
from .runrecord import RECORD, default_name

# Arguments a resumed run may change (the micro-batch split of --fast is re-planned anyway).
RESUMABLE_CHANGES = {"max_steps", "num_train_epochs", "save_steps", "logging_steps", "report_to", "save_merged",
                     "save_gguf", "push_to_hub", "cudnn_attention", "fast", "sample_prompts"}
# A resumed run may split its effective batch (their product) differently, e.g. smaller after running out of memory:
# the loss is normalised over all tokens of the optimizer step, so each step still learns the same.
SPLIT = ("per_device_train_batch_size", "gradient_accumulation_steps")
# What this invocation is asked to do, never taken from the record.
PER_INVOCATION = {"resume", "overwrite", "output_dir"}
# infer.py may load the run's adapter on another copy of the base or with another context length.
INFER_CHANGES = {"model_name", "max_seq_length"}


PATH_ARGS = {"dataset", "model_name", "sample_prompts"}  # may name local files, typed relative to a folder


def located(value, workdir: str):
    """An existing local path as an absolute one (relative to `workdir`, else the current folder); other values
    (a Hub id, a list, '') as they are."""
    if not isinstance(value, str) or not value:
        return value
    for base in filter(None, (workdir, ".")):
        path = Path(base, value).expanduser()
        if path.exists():
            return str(path.resolve())
    return value


def same(given, recorded) -> bool:
    """CLI text and the recorded list name the same modules: 'q_proj' == ['q_proj'], (a, b) == [a, b]."""
    if isinstance(recorded, list) and isinstance(given, (str, tuple, list)):
        given = names(given)
    return given == recorded


def merge(recorded: dict, given: dict, may_change: set, what: str) -> dict:
    """The recorded values overridden by the given ones; a given value that differs from the record for a setting
    that may not change is refused with both values."""
    for key, value in given.items():
        if key in recorded and key not in may_change and not same(value, recorded[key]):
            raise UserError(f"{what}: --{key} {value!r} differs from the run's ({recorded[key]!r}). Drop --{key} to "
                            "use the run's, or start a new run in another --output_dir.")
    return {**recorded, **given}


def resumable(fn):
    """Wraps train(): with resume=True, every argument the caller did not give takes the value recorded in the
    run's run.json, so `--resume --output_dir X` alone continues X exactly (its step count too). The CLI passes
    only the arguments typed (cli.run_cli), so `--max_steps 60` counts even though 60 is the default."""
    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        given = dict(sig.bind_partial(*args, **kwargs).arguments)
        if given.get("resume"):
            full = {name: p.default for name, p in sig.parameters.items()} | given
            given["output_dir"] = full["output_dir"] or default_name(full["model_name"], full["dataset"])
            given = resume_args(given["output_dir"], given, set(sig.parameters))
        return fn(**given)

    return wrapper


def resume_args(output_dir: str, given: dict, known: set) -> dict:
    """The recorded arguments of the run to resume (those `known` to train()) merged with the given ones."""
    folder = RunFolder(output_dir)
    if not folder.exists():
        return given  # nothing recorded: claim() says what is missing
    rec = folder.read()  # a damaged record is an error here, never a silent fall back to the defaults
    recorded = {k: v for k, v in rec.args.items() if k in known and k not in PER_INVOCATION}
    # Paths typed relative to another folder: resumed from here, both sides name files by where they are.
    for key in PATH_ARGS & set(recorded):
        recorded[key] = located(recorded[key], rec.workdir)
        if key in given:
            given = {**given, key: located(given[key], "")}
    merged = merge(recorded, given, RESUMABLE_CHANGES | PER_INVOCATION | set(SPLIT), "--resume")
    if all(k in recorded for k in SPLIT):  # the rows of each step stay the same: only how they are split changes
        was, now = tuple(int(recorded[k]) for k in SPLIT), tuple(int(merged[k]) for k in SPLIT)
        if was[0] * was[1] != now[0] * now[1]:
            raise UserError(f"--resume: micro-batch {now[0]} x accumulation {now[1]} is an effective batch of "
                            f"{now[0] * now[1]}, the run being resumed used {was[0]} x {was[1]} = {was[0] * was[1]}. "
                            "A resumed run may split its batch differently (after running out of memory, e.g. "
                            f"--per_device_train_batch_size {max(was[0] // 2, 1)} --gradient_accumulation_steps "
                            f"{was[0] * was[1] // max(was[0] // 2, 1)}), not change it.")
    return merged


def check_adapter_files(run: Path, fix: str = ""):
    """The adapter's files read as what they are, before the base model loads (a copy cut short, an edit gone
    wrong): peft and safetensors would fail on them with a traceback after the load."""
    fix = fix or (f"Put back a good copy of it (e.g. from the Hub upload), or train again with train_unsloth.py "
                  f"--overwrite --output_dir {run}")
    try:
        config = json.loads((run / "adapter_config.json").read_text(encoding="utf-8"))
    except (ValueError, OSError) as err:
        raise UserError(f"{run / 'adapter_config.json'} is damaged ({type(err).__name__}: {err}). {fix}.") from err
    if not isinstance(config, dict):
        raise UserError(f"{run / 'adapter_config.json'} is damaged (not a JSON object). {fix}.")
    weights = run / "adapter_model.safetensors"
    if weights.is_file() and not readable_weights(weights):
        raise UserError(f"{weights} is cut off or damaged (its header or size is wrong). {fix}.")


def is_checkpoint(path: Path) -> bool:
    """A checkpoint-N of a run: served with its adapter and the run's record, to try it without resuming or
    finishing the run."""
    return path.name.startswith("checkpoint-") and (path.parent / RECORD).is_file() and not (path / RECORD).is_file()


def run_of(adapter: str) -> Path:
    """The run folder an --adapter (a run folder or one of its checkpoints) belongs to."""
    path = Path(adapter)
    return path.parent if is_checkpoint(path) else path


def adapter_record(adapter: str):
    """The record of the run an --adapter belongs to."""
    return RunFolder(run_of(adapter)).read()


def inference_settings(adapter: str, given: dict) -> tuple[dict, object]:
    """infer.py --adapter: the base model, template name, context length and 4-bit setting the run trained with,
    with the given ones merged by the same rule. Returns (settings, record)."""
    path = Path(adapter)
    checkpoint = is_checkpoint(path)
    folder = RunFolder(run_of(adapter))
    rec = folder.read()
    has_adapter = (path / "adapter_config.json").is_file() and any(
        (path / n).is_file() for n in ("adapter_model.safetensors", "adapter_model.bin"))
    if checkpoint:
        other = "another checkpoint-N of the run, or the run folder once it has finished"
        if not has_adapter:
            raise UserError(f"{adapter!r} is a checkpoint of {str(folder.path)!r} without adapter files (cut off by a "
                            f"kill or a full disk): pass {other}.")
        check_adapter_files(path, fix=f"Pass {other}")
    elif not has_adapter:
        lost = f"{adapter!r} has run.json but no adapter (adapter_config.json and adapter_model.safetensors)"
        newest = folder.checkpoints(quiet=True)  # --resume needs one: without, only a new start is possible
        resumable = bool(newest)
        also = f" (or try its newest checkpoint: infer.py --adapter {newest[-1]})" if newest else ""
        if rec.status == "running":
            raise UserError(f"{lost}: its run is still training, or was killed. Wait for it to finish; if it was "
                            f"killed, {continue_or_restart(adapter, resumable)}{also}")
        if rec.status == "finished":
            raise UserError(f"{lost}, though its run finished: the adapter files were moved or deleted. Put them "
                            f"back, or train again with train_unsloth.py --overwrite --output_dir {adapter}")
        if not resumable:
            raise UserError(f"{lost}: its run ended ({rec.status}) before saving a checkpoint. Train again with "
                            f"train_unsloth.py --overwrite --output_dir {adapter}")
        raise UserError(f"{lost}: its run ended ({rec.status}) before saving the adapter. Continue it with "
                        f"train_unsloth.py --resume --output_dir {adapter}{also}")
    else:
        check_adapter_files(folder.path)
    base = rec.model_path or rec.args.get("model_name")
    if not given.get("model_name") and base and Path(base).is_absolute() and not Path(base).exists():
        raise UserError(f"the base model this run trained on, {base} (run.json's model_path), is not there any more: "
                        f"pass --model_name with its folder now (or its Hub id), e.g. infer.py --adapter {adapter} "
                        "--model_name PATH.")
    recorded = {"model_name": base, "prompt": rec.template,
                "max_seq_length": rec.args.get("max_seq_length", 2048),
                "load_in_4bit": rec.args.get("load_in_4bit", True)}
    return merge(recorded, {k: v for k, v in given.items() if v not in ("", 0, None)}, INFER_CHANGES,
                 f"--adapter {adapter}"), rec
