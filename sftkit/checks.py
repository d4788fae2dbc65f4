"""train_unsloth.py's argument checks that need no model or data: a typo fails in a second, before the slow
load, and never after --overwrite has moved a finished run aside. Each error names the argument and the fix."""

import difflib
import importlib.util

from .errors import UserError

# pip package of a transformers integration, where it is not the integration's own name
PACKAGES = {"azure_ml": "azureml-core", "comet_ml": "comet-ml", "flyte": "flytekit"}
ZERO = {"warmup_steps": "no warm-up", "save_steps": "no checkpoints", "max_samples": "all rows"}  # what 0 means


def numbers(a: dict):
    """Counts, sizes and rates that must be in range."""
    for key in ("per_device_train_batch_size", "gradient_accumulation_steps", "max_seq_length", "r",
                "logging_steps"):
        if int(a[key]) < 1:
            raise UserError(f"--{key} must be a positive whole number, got {a[key]!r}.")
    for key in ("warmup_steps", "save_steps", "max_samples"):
        if int(a[key]) < 0:
            raise UserError(f"--{key} must be 0 or more, got {a[key]!r} (0 means {ZERO[key]}).")
    if a["max_steps"] == 0 or a["max_steps"] < -1:
        raise UserError(f"--max_steps {a['max_steps']!r}: give the number of optimizer steps, or -1 to train for "
                        "--num_train_epochs passes over the data.")
    if a["max_steps"] == -1 and not a["num_train_epochs"] > 0:
        raise UserError(f"--num_train_epochs must be above 0 with --max_steps -1, got {a['num_train_epochs']!r}.")
    if not a["learning_rate"] > 0:
        raise UserError(f"--learning_rate must be above 0, got {a['learning_rate']!r} (the notebook uses 2e-4).")
    if not a["lora_alpha"] > 0:
        raise UserError(f"--lora_alpha must be above 0, got {a['lora_alpha']!r}: the adapter's output is scaled "
                        "by lora_alpha / r, so 0 would train an adapter that changes nothing (the notebook: 16).")
    if not 0 <= a["lora_dropout"] < 1:
        raise UserError(f"--lora_dropout must be in [0, 1), got {a['lora_dropout']!r} (0 is fastest on Unsloth).")
    seed(a["seed"])
    v = a["val_size"]
    if v < 0 or (v >= 1 and v != int(v)):
        raise UserError(f"--val_size {v!r}: give a fraction between 0 and 1 (0.05) or a whole count of rows (200).")


def seed(value):
    """A seed every library takes (numpy's range), checked before anything loads."""
    if not 0 <= int(value) < 2**32:
        raise UserError(f"--seed must be a whole number from 0 to {2**32 - 1}, got {value!r}.")


def report_to(value) -> list:
    """--report_to as transformers takes it: one name, or several ('tensorboard,wandb', which Fire passes as a
    tuple)."""
    from .cli import names

    return names(value) or ["none"]


# Optimizers transformers knows whose package is optional: (name prefix, module, pip name). Checked by import spec,
# not by building TrainingArguments, which would set up a gloo process group under torchrun.
OPTIM_PACKAGES = (("schedule_free", "schedulefree", "schedulefree"), ("grokadamw", "grokadamw", "grokadamw"),
                  ("stable_adamw", "optimi", "torch-optimi"), ("adamw_torch_4bit", "torchao", "torchao"),
                  ("adamw_torch_8bit", "torchao", "torchao"), ("adamw_anyprecision", "torchdistx", "torchdistx"))


def known_names(optim: str, lr_scheduler_type: str, reporters=("none",)):
    """Names transformers must know. Imports transformers, so call it after the backend is chosen (Unsloth
    has to be imported first)."""
    from transformers.integrations import integration_utils

    known = list(integration_utils.INTEGRATION_TO_CALLBACK)
    installed = set(integration_utils.get_available_reporting_integrations())
    for name in report_to(reporters):
        if name in ("none", "all") or name in installed:
            continue
        if name not in known:  # never suggest installing a typo: a look-alike package may be anything
            close = difflib.get_close_matches(name, known, n=1)
            raise UserError(f"--report_to {name!r} is not one of transformers' integrations"
                            + (f"; did you mean {close[0]!r}?" if close else "") + f" Known: {', '.join(known)}, "
                            "none, all.")
        raise UserError(f"--report_to {name} needs its package: pip install {PACKAGES.get(name, name)}, or drop "
                        "--report_to (metrics.jsonl and `memory_report.py plot` need nothing).")
    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames

    for flag, value, known, example in (("optim", optim, [o.value for o in OptimizerNames], "adamw_8bit"),
                                        ("lr_scheduler_type", lr_scheduler_type, [s.value for s in SchedulerType],
                                         "linear")):
        if value not in known:
            close = difflib.get_close_matches(value, known, n=4)
            raise UserError(f"--{flag} {value!r} is not known to transformers; e.g. {example}"
                            + (f" (close: {', '.join(close)})." if close else "."))
    need = next(((mod, pip) for prefix, mod, pip in OPTIM_PACKAGES if optim.startswith(prefix)), None)
    if optim.startswith(("galore", "apollo", "lomo", "adalomo")):  # they need settings train() does not take
        raise UserError(f"--optim {optim} needs settings train_unsloth.py does not pass (target modules, or the model "
                        "to the optimizer): use --optim adamw_8bit (the notebook's) or another AdamW variant.")
    if need and importlib.util.find_spec(need[0]) is None:  # found now, not after the model loads
        raise UserError(f"--optim {optim} needs a package that is not installed: pip install {need[1]}, or use "
                        "--optim adamw_8bit (the notebook's).")
