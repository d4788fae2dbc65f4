"""What to type after a run stopped badly (out of memory, a second Ctrl-C): the command that fits what is on disk,
never one train_unsloth.py would then refuse."""

from .runfolder import RunFolder


def oom_advice(output_dir: str, settled: str, fast: bool, micro: int, checkpointing: bool) -> str:
    """What to run after running out of memory: resume from this run's checkpoints if it has any, else start it
    again; with a smaller micro-batch (same effective batch) or without --fast."""
    smaller = (f"without --fast (it picked micro-batch {micro} with gradient checkpointing "
               f"{'on' if checkpointing else 'off'})" if fast else "with a lower --per_device_train_batch_size and "
               "a --gradient_accumulation_steps as much higher (same effective batch)")
    if settled == "restored":
        how = f"The previous run in {output_dir} is back, unchanged; try again with --overwrite {smaller}"
    elif RunFolder(output_dir).checkpoints(quiet=True):
        how = f"Its checkpoints in {output_dir} are kept: continue with --resume {smaller}"
    else:
        how = f"No checkpoint was saved yet: start again with --overwrite {smaller}"
    return (f"{how}. A lower --max_seq_length also fits, in a new run (--overwrite); `python memory_report.py "
            "estimate` predicts what fits.")


def aborted_advice(output_dir: str, settled: str) -> str:
    """After a second Ctrl-C (no checkpoint saved for the current step): what is on disk, and the command for it."""
    ckpts = RunFolder(output_dir).checkpoints(quiet=True)
    if ckpts:
        return (f"aborted; the newest checkpoint, {ckpts[-1].name}, is kept: continue with python train_unsloth.py "
                f"--resume --output_dir {output_dir}")
    if settled == "restored":
        return f"aborted before the first checkpoint; the previous run in {output_dir} is back, unchanged"
    return (f"aborted before the first checkpoint, so no step was saved: start again with python train_unsloth.py "
            f"--overwrite --output_dir {output_dir}")


def continue_or_restart(output_dir, resumable: bool) -> str:
    """The command for an unfinished run: --resume needs a complete checkpoint, without one only a new start."""
    if resumable:
        return f"continue it with `python train_unsloth.py --resume --output_dir {output_dir}`"
    return (f"start it again with `python train_unsloth.py --overwrite --output_dir {output_dir}` (it saved no "
            "checkpoint to resume from)")
