"""Nothing is lost: --overwrite keeps the old run until the new one has earned its place, a resume after running
out of memory may split the batch differently, and bad arguments are refused before anything loads."""

import json
import shutil
from pathlib import Path

import pytest

from conftest import SAMPLE, TINY, checkpoint, metrics, quick_args, write_jsonl
from sftkit.runfolder import RECORD, RunFolder, RunRecord
from sftkit.errors import UserError
from train_unsloth import train


def test_overwrite_that_fails_in_training_puts_the_old_run_back(tmp_path, tiny_run, monkeypatch):
    import trl

    old = tmp_path / "run"
    shutil.copytree(tiny_run, old)
    adapter = (old / "adapter_model.safetensors").read_bytes()

    def fails(self, *a, **k):  # as an optimizer a package is missing for, or a NaN check, would: inside train()
        raise RuntimeError("boom in the first step")

    monkeypatch.setattr(trl.SFTTrainer, "train", fails)
    with pytest.raises(RuntimeError, match="boom"):
        train(**quick_args(tmp_path, max_steps=2, overwrite=True))
    rec = json.loads((old / "run.json").read_text())
    assert rec["status"] == "finished" and (old / "adapter_model.safetensors").read_bytes() == adapter
    assert not (tmp_path / "run.replaced").exists()


def test_overwrite_that_finishes_drops_the_old_run(tmp_path, tiny_run):
    shutil.copytree(tiny_run, tmp_path / "run")
    out = train(**quick_args(tmp_path, max_steps=2, save_steps=0, overwrite=True))
    assert [m["step"] for m in metrics(out)] == [1, 2] and not (tmp_path / "run.replaced").exists()


def test_folders_of_the_users_own_are_never_offered_to_overwrite(tmp_path, tiny_run):
    """A non-empty folder train_unsloth.py did not write: the error does not suggest the --overwrite it would refuse;
    and a folder of the user's own named RUN.replaced is not called an earlier run."""
    mine = tmp_path / "run"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="holds files that are not a run") as err:
        train(**quick_args(tmp_path, max_steps=2))
    assert "--overwrite" not in str(err.value)
    shutil.rmtree(mine)
    shutil.copytree(tiny_run, mine)
    (tmp_path / "run.replaced").mkdir()
    (tmp_path / "run.replaced" / "mine.txt").write_text("mine")
    with pytest.raises(UserError, match="run.replaced, which already exists and is not a run.*rename or move"):
        train(**quick_args(tmp_path, max_steps=2, overwrite=True))
    assert (tmp_path / "run.replaced" / "mine.txt").read_text() == "mine" and (mine / "run.json").is_file()


def test_a_leftover_from_an_earlier_overwrite_is_never_deleted(tmp_path, tiny_run):
    shutil.copytree(tiny_run, tmp_path / "run")
    shutil.copytree(tiny_run, tmp_path / "run.replaced")  # maybe the only finished copy
    with pytest.raises(UserError, match=r"run.replaced holds the run an earlier --overwrite.*delete or move"):
        train(**quick_args(tmp_path, max_steps=2, overwrite=True))
    assert (tmp_path / "run.replaced" / "adapter_model.safetensors").is_file()


def test_a_failure_after_a_checkpoint_keeps_both_runs(tmp_path):
    """The folder's lifecycle on its own: the new run saved a checkpoint before failing, so it is resumable and
    stays, and so does the old one, beside it; finishing later drops the old one."""
    path = tmp_path / "run"
    path.mkdir()
    (path / RECORD).write_text('{"status": "finished", "args": {}}')
    folder = RunFolder(path)
    folder.claim(overwrite=True, resume=False)
    record = RunRecord()
    folder.begin(record, fresh=True)
    old = folder.replaced
    assert old == tmp_path / "run.replaced" and (old / RECORD).is_file() and path.is_dir()
    ckpt = checkpoint(path, 2)
    assert folder.fail(record, RuntimeError("boom")) == "kept"
    assert ckpt.is_dir() and (old / RECORD).is_file()
    resumed, again = RunRecord(status="finished"), RunFolder(path)  # as --resume: a new record, the same folder
    again.begin(resumed, fresh=False)
    again.finish(resumed)
    assert not old.exists() and ckpt.is_dir()


def test_a_replaced_folder_this_run_did_not_make_is_never_deleted(tmp_path, tiny_run):
    """RUN.replaced may be the only copy of a finished run (an --overwrite failed after a checkpoint, then the user
    moved RUN away): a new run into RUN that replaced nothing leaves it alone."""
    shutil.copytree(tiny_run, tmp_path / "run.replaced")
    out = train(**quick_args(tmp_path, max_steps=2, save_steps=0))
    assert json.loads((Path(out) / "run.json").read_text())["status"] == "finished"
    assert (tmp_path / "run.replaced" / "adapter_model.safetensors").is_file()


def test_resume_may_split_the_batch_differently_and_learns_the_same(tmp_path):
    """After running out of memory at 2 x 4, a run resumes at 1 x 8: the same rows per step and, up to
    floating-point order, the same losses as the same run resumed at 2 x 4."""
    args = quick_args(tmp_path, max_samples=32, save_steps=2, learning_rate=5e-3, max_steps=2)
    same, split = str(tmp_path / "same"), str(tmp_path / "split")
    for out in (same, split):
        train(**{**args, "output_dir": out})
    with pytest.raises(UserError, match="effective batch of 6.*2 x 4 = 8.*split its batch differently"):
        train(output_dir=split, resume=True, max_steps=4, per_device_train_batch_size=2,
              gradient_accumulation_steps=3)
    train(output_dir=same, resume=True, max_steps=4)
    train(output_dir=split, resume=True, max_steps=4, per_device_train_batch_size=1, gradient_accumulation_steps=8)
    rec = json.loads((Path(split) / "run.json").read_text())
    assert rec["status"] == "finished" and rec["args"]["per_device_train_batch_size"] == 1
    a, b = metrics(same), metrics(split)
    assert [m["step"] for m in b] == [1, 2, 3, 4]
    assert [m["tokens_seen"] for m in a] == [m["tokens_seen"] for m in b]  # the same rows in each step
    assert a[2]["loss"] != a[1]["loss"]  # the resumed steps trained (the losses moved)
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4)
    import memory_report  # its figures cover the resumed session only, and it says so

    assert "resumed from checkpoint-2: time, tokens and memory below are this last session's" in \
        memory_report.show(split)
    assert "| split (last session) |" in memory_report.compare(split)


def test_resume_refuses_a_target_it_has_passed_and_says_overwrite_when_nothing_was_saved(tmp_path):
    out = train(**quick_args(tmp_path, max_steps=4, save_steps=2))
    rec_path = Path(out) / "run.json"
    rec_path.write_text(json.dumps({**json.loads(rec_path.read_text()), "status": "running"}))  # killed at the end
    with pytest.raises(UserError, match=r"--max_steps 3 \(given or recorded\) is below .* newest checkpoint, 4"):
        train(output_dir=out, resume=True, max_steps=3)
    train(output_dir=out, resume=True)  # killed after its last checkpoint: a plain --resume still finishes it
    assert json.loads(rec_path.read_text())["status"] == "finished"
    for ckpt in RunFolder(out).checkpoints():
        shutil.rmtree(ckpt)
    with pytest.raises(UserError, match="saved no complete checkpoint.*--overwrite"):
        train(output_dir=out, resume=True)


@pytest.mark.parametrize("bad, match", [
    ({"learning_rate": -1.0}, "--learning_rate must be above 0"),
    ({"lora_alpha": 0}, "--lora_alpha must be above 0"),
    ({"lora_dropout": 1.5}, r"--lora_dropout must be in \[0, 1\)"),
    ({"max_steps": 0}, "--max_steps 0: give the number"),
    ({"max_steps": -1, "num_train_epochs": 0.0}, "--num_train_epochs must be above 0"),
    ({"max_samples": -3}, "--max_samples must be 0 or more.*all rows"),
    ({"save_steps": -1}, "--save_steps must be 0 or more"),
    ({"report_to": "tensorbord"}, "--report_to 'tensorbord' is not one of transformers' integrations; did you mean "
                                  "'tensorboard'"),
    ({"report_to": "none,comet_ml"}, "--report_to comet_ml needs its package: pip install comet-ml"),
    ({"optim": "adamw_8bti"}, "--optim 'adamw_8bti' is not known to transformers.*adamw_8bit"),
    ({"optim": "lomo"}, "--optim lomo needs settings train_unsloth.py does not pass.*adamw_8bit"),
    ({"optim": "schedule_free_adamw"}, "--optim schedule_free_adamw needs a package that is not installed: pip "
                                       "install schedulefree"),  # not in requirements.txt
    ({"lr_scheduler_type": "cosin"}, "--lr_scheduler_type 'cosin' is not known.*cosine"),
])
def test_bad_arguments_are_refused_before_the_run_folder_is_touched(tmp_path, tiny_run, bad, match):
    shutil.copytree(tiny_run, tmp_path / "run")
    before = (tmp_path / "run" / "run.json").read_bytes()
    with pytest.raises(UserError, match=match):
        train(**quick_args(tmp_path, overwrite=True, **bad))
    assert (tmp_path / "run" / "run.json").read_bytes() == before and not (tmp_path / "run.replaced").exists()


def test_a_failed_run_gives_ctrl_c_back(tmp_path, monkeypatch):
    """Training takes SIGINT/SIGTERM over (checkpoint, then stop); a run that fails inside train() skips
    on_train_end, and must still hand the handlers back, or Ctrl-C would do nothing in the notebook afterwards."""
    import signal

    import transformers

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)

    def step_fails(self, *a, **k):
        assert signal.getsignal(signal.SIGINT) not in before[:1]  # the run's own handler is in place here
        raise RuntimeError("boom inside a step")

    monkeypatch.setattr(transformers.Trainer, "training_step", step_fails)
    with pytest.raises(RuntimeError, match="boom inside a step"):
        train(**quick_args(tmp_path, max_steps=2))
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_overwrite_through_a_symlink_and_of_the_working_folder(tmp_path, tiny_run, monkeypatch):
    real = tmp_path / "disk" / "run"
    real.parent.mkdir()
    shutil.copytree(tiny_run, real)
    link = tmp_path / "run"
    link.symlink_to(real, target_is_directory=True)
    out = train(**quick_args(tmp_path, max_steps=2, save_steps=0, overwrite=True))  # output_dir is the link
    assert link.is_symlink() and (real / "run.json").is_file() and [m["step"] for m in metrics(out)] == [1, 2]
    assert not (tmp_path / "disk" / "run.replaced").exists() and not (tmp_path / "run.replaced").exists()
    monkeypatch.chdir(real)
    with pytest.raises(UserError, match="is the folder you are working in"):
        train(**{**quick_args(tmp_path, max_steps=2, overwrite=True), "output_dir": "."})
    assert (real / "run.json").is_file()


def test_a_kept_old_run_goes_when_the_new_one_is_resumed_to_the_end(tmp_path, tiny_run, monkeypatch):
    """--overwrite, then the new run fails after its first checkpoint: both are kept. Resumed and finished, the
    new run then drops the old one, so a later --overwrite is not blocked by it."""
    import transformers

    shutil.copytree(tiny_run, tmp_path / "run")
    real_step, calls = transformers.Trainer.training_step, []

    def fails_in_step_3(self, *a, **k):  # 4 micro-batches a step: call 9 is step 3, after checkpoint-2
        calls.append(1)
        if len(calls) == 9:
            raise RuntimeError("boom in step 3")
        return real_step(self, *a, **k)

    monkeypatch.setattr(transformers.Trainer, "training_step", fails_in_step_3)
    with pytest.raises(RuntimeError, match="boom in step 3"):
        train(**quick_args(tmp_path, max_steps=4, save_steps=2, overwrite=True))
    monkeypatch.undo()
    assert (tmp_path / "run" / "checkpoint-2").is_dir() and (tmp_path / "run.replaced" / "run.json").is_file()
    train(output_dir=str(tmp_path / "run"), resume=True)
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "finished"
    assert not (tmp_path / "run.replaced").exists()


def test_out_of_memory_advice_fits_what_is_left(tmp_path, tiny_run, monkeypatch):
    import torch
    import trl

    def oom(self, *a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(trl.SFTTrainer, "train", oom)
    shutil.copytree(tiny_run, tmp_path / "run")
    with pytest.raises(UserError, match="previous run in .* is back, unchanged; try again with --overwrite"):
        train(**quick_args(tmp_path, max_steps=2, overwrite=True))
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "finished"
    with pytest.raises(UserError, match="No checkpoint was saved yet: start again with --overwrite with a lower "
                                       "--per_device_train_batch_size"):
        train(**quick_args(tmp_path / "fresh", max_steps=2))


def test_resume_refuses_data_that_changed_since_the_run_started(tmp_path):
    rows = [json.loads(line) for line in Path(quick_args(tmp_path)["dataset"]).read_text().splitlines()[:16]]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    out = train(**quick_args(tmp_path, dataset=data, max_steps=2, save_steps=2))
    rows[3]["output"] = "바뀐 답"  # one answer edited after the run
    write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(UserError, match="--resume: the data differ from those the run .* started with"):
        train(output_dir=out, resume=True, max_steps=4)


def test_resume_and_infer_from_another_folder_find_paths_typed_relative(tmp_path, monkeypatch):
    """A run trained with relative --model_name / --dataset is resumed from another folder: the recorded paths are
    found where they were typed (run.json's workdir), and the same file typed by its absolute path is not called
    different. infer.py on a run whose base folder moved says so and names --model_name."""
    import os

    from infer import infer

    here = tmp_path / "project"
    here.mkdir()
    shutil.copy(SAMPLE, here / "data.jsonl")
    shutil.copytree(TINY, here / "base")
    monkeypatch.chdir(here)
    run = train(model_name="base", dataset="data.jsonl", max_samples=16, max_steps=2, save_steps=2,
                output_dir=str(tmp_path / "run"))
    assert json.loads((Path(run) / "run.json").read_text())["workdir"] == os.getcwd()
    monkeypatch.chdir(tmp_path)
    out = train(resume=True, output_dir=str(tmp_path / "run"), max_steps=3, dataset=str(here / "data.jsonl"))
    assert json.loads((Path(out) / "run.json").read_text())["metrics"]["global_step"] == 3
    (here / "base").rename(here / "moved")
    with pytest.raises(UserError, match="is not there any more: pass --model_name"):
        infer(adapter=out, instruction="안녕")
