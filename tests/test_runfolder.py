"""The run folder's own rules, without training: the lock, what --overwrite may replace, half-written checkpoints,
a damaged record, and the one merge rule --resume and infer.py share."""

import json
import os
import subprocess
import sys

import pytest

from conftest import checkpoint, weights
from sftkit import recorded
from sftkit.errors import UserError
from sftkit.runfolder import LOCK, RunFolder
from sftkit.runrecord import RECORD, SCHEMA, RunRecord


def finished_run(path, **record):
    path.mkdir(parents=True, exist_ok=True)
    (path / RECORD).write_text(json.dumps({"status": "finished", "args": {"max_steps": 4}, **record}))
    weights(path / "adapter_model.safetensors")
    return path


def test_a_second_training_into_a_locked_folder_is_refused(tmp_path):
    """Another live process holds the folder (as a training run would): refused until it lets go."""
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from sftkit.runfolder import RunFolder; f = RunFolder(sys.argv[1]); "
        "f.claim(overwrite=False, resume=False); print('held', flush=True); sys.stdin.readline(); f.unlock()"),
        str(tmp_path / "run")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=f"in use by another training run \\(process .* {holder.pid}\\)"):
            RunFolder(tmp_path / "run").claim(overwrite=False, resume=False)
    finally:
        holder.communicate("go\n", timeout=30)
    assert not (tmp_path / "run" / LOCK).exists()
    RunFolder(tmp_path / "run").claim(overwrite=False, resume=False)  # free again once released


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    path = tmp_path / "run"
    path.mkdir()
    import socket

    (path / LOCK).write_text(f"{socket.gethostname()} {dead.stdout.strip()}")  # that process has exited
    folder = RunFolder(path)
    folder.claim(overwrite=False, resume=False)
    assert (path / LOCK).read_text() == f"{socket.gethostname()} {os.getpid()}"


def test_overwrite_refuses_a_folder_holding_the_users_own_files(tmp_path):
    path = finished_run(tmp_path / "run")
    (path / "my_notes.txt").write_text("mine")
    with pytest.raises(UserError, match="files sftkit did not write: my_notes.txt"):
        RunFolder(path).claim(overwrite=True, resume=False)
    assert (path / "my_notes.txt").read_text() == "mine" and not (path / LOCK).exists()
    (path / "my_notes.txt").unlink()
    checkpoint(path, 2)
    (path / "metrics.jsonl").write_text("")
    (path / "report.png").write_bytes(b"png")  # memory_report.py plot writes it
    assert RunFolder(path).claim(overwrite=True, resume=False) is None  # only what sftkit wrote: allowed


def test_overwrite_refuses_the_users_files_inside_the_folders_sftkit_writes(tmp_path):
    """A note in checkpoint-N/, a second GGUF in merged-16bit/, an extra file in gguf/, a Modelfile edited since the
    export, a hand-made merged-manual/ and a Modelfile of one's own at the top are named, and nothing is deleted.
    What the trainer and the exports write passes: other tokenizer families' files, the Hub's bookkeeping that
    Unsloth's merge leaves in merged-16bit/."""
    from sftkit.ours import digest

    path = finished_run(tmp_path / "run")
    ckpt = checkpoint(path, 2)
    for name in ("merged-16bit/model.safetensors", "merged-16bit/config.json", "merged-16bit/chat_template.jinja",
                 "merged-16bit/.cache/huggingface/download/model.safetensors.index.json.metadata",
                 "merged-16bit/.cache/huggingface/.gitignore", "gguf/model-q4_k_m.gguf", "gguf/Modelfile",
                 "checkpoint-2/rng_state_1.pth", "checkpoint-2/scaler.pt", "tokenizer.model", "vocab.json",
                 "merges.txt", "added_tokens.json", "runs/Nov29_host/events.out.tfevents.1.host"):
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text("sftkit's")
    record = json.loads((path / RECORD).read_text())
    record["exports"] = {"gguf": {"modelfile_sha256": digest(path / "gguf" / "Modelfile")}}
    (path / RECORD).write_text(json.dumps(record))
    assert RunFolder(path).foreign() == []
    mine = ["checkpoint-2/mynote.txt", "gguf/Modelfile.custom", "merged-16bit/my-other.gguf", "Modelfile",
            "merged-manual"]
    (path / "merged-manual").mkdir()
    for name in mine[:4]:
        (path / name).write_text("mine")
    (path / "gguf" / "Modelfile").write_text("sftkit's\nPARAMETER num_ctx 8192\n")  # the user's edit
    with pytest.raises(UserError) as err:
        RunFolder(path).claim(overwrite=True, resume=False)
    assert all(name in str(err.value) for name in mine), str(err.value)
    assert "gguf/Modelfile (changed since the export wrote it)" in str(err.value)
    assert all((path / name).read_text() == "mine" for name in mine[:4])
    assert ckpt.is_dir() and not (path / LOCK).exists()


def test_a_half_written_checkpoint_is_skipped_for_the_newest_complete_one(tmp_path, caplog):
    path = finished_run(tmp_path / "run", status="interrupted")
    good = checkpoint(path, 2)
    checkpoint(path, 4, parts=("adapter_model.safetensors",))  # killed before trainer_state.json
    cut = checkpoint(path, 6)
    (cut / "trainer_state.json").write_text('{"global_st')  # disk full mid-write
    checkpoint(path, 8, parts=("trainer_state.json", "adapter_model.safetensors"))  # no optimizer state
    torn = checkpoint(path, 10) / "adapter_model.safetensors"
    torn.write_bytes(torn.read_bytes()[:-8])  # weights cut short: --resume used to die in safetensors
    with caplog.at_level("INFO", logger="sftkit"):
        assert RunFolder(path).claim(overwrite=False, resume=True, max_steps=12) == good
    said = caplog.text
    assert "skipping checkpoint-4: no trainer_state.json" in said
    assert "skipping checkpoint-6: trainer_state.json is cut off" in said
    assert "skipping checkpoint-8: no optimizer state" in said
    assert "skipping checkpoint-10: adapter_model.safetensors is cut off or damaged" in said


def test_a_damaged_record_is_an_error_naming_the_file_never_the_defaults(tmp_path):
    path = finished_run(tmp_path / "run")
    checkpoint(path, 2)
    (path / RECORD).write_text('{"status": "finished", "args": {"max_st')
    for call in (lambda: RunFolder(path).read(),
                 lambda: RunFolder(path).claim(overwrite=False, resume=True),
                 lambda: recorded.resume_args(str(path), {"resume": True}, {"max_steps"})):
        with pytest.raises(UserError, match=r"run\.json is damaged.*--overwrite"):
            call()
    (path / RECORD).write_text('["not", "a", "record"]')
    with pytest.raises(UserError, match="damaged.*not a run record"):
        RunFolder(path).read()


def test_the_record_is_typed_versioned_and_keeps_unknown_keys(tmp_path):
    path = finished_run(tmp_path / "run", future_key={"x": 1})  # an older record: no schema key
    rec = RunFolder(path).read()
    assert rec.status == "finished" and rec.args == {"max_steps": 4} and rec.schema == SCHEMA
    RunFolder(path).save(rec)
    saved = json.loads((path / RECORD).read_text())
    assert saved["schema"] == SCHEMA and saved["future_key"] == {"x": 1}
    (path / RECORD).write_text(json.dumps({**saved, "schema": SCHEMA + 1}))
    with pytest.raises(UserError, match="newer sftkit.*git pull"):
        RunFolder(path).read()


def test_one_merge_rule_for_resume_and_infer(tmp_path):
    (tmp_path / "base").mkdir()
    path = finished_run(tmp_path / "run", model_path=str(tmp_path / "base"), template="alpaca_ko",
                        args={"max_seq_length": 1024, "load_in_4bit": True, "learning_rate": 2e-4})
    (path / "adapter_config.json").write_text("{}")
    settings, rec = recorded.inference_settings(str(path), {"model_name": "", "prompt": "", "max_seq_length": 0})
    assert settings == {"model_name": str(tmp_path / "base"), "prompt": "alpaca_ko", "max_seq_length": 1024,
                        "load_in_4bit": True}
    assert recorded.inference_settings(str(path), {"model_name": "/copy/of/base"})[0]["model_name"] == "/copy/of/base"
    with pytest.raises(UserError, match="--prompt 'chatml' differs from the run's \\('alpaca_ko'\\)"):
        recorded.inference_settings(str(path), {"prompt": "chatml"})
    with pytest.raises(UserError, match="--resume: --learning_rate 0.001 differs"):
        recorded.resume_args(str(path), {"resume": True, "learning_rate": 1e-3}, {"learning_rate", "resume"})


def test_lifecycle_restores_the_replaced_run_when_the_new_one_gains_nothing(tmp_path):
    path = finished_run(tmp_path / "run")
    weights = (path / "adapter_model.safetensors").read_bytes()
    folder = RunFolder(path)
    folder.claim(overwrite=True, resume=False)
    folder.begin(RunRecord(args={"max_steps": 9}), fresh=True)
    assert (tmp_path / "run.replaced" / "adapter_model.safetensors").is_file()
    assert json.loads((path / RECORD).read_text())["status"] == "running"
    assert folder.fail(RunRecord(), KeyboardInterrupt()) == "restored"
    assert (path / "adapter_model.safetensors").read_bytes() == weights
    assert not (tmp_path / "run.replaced").exists() and not (path / LOCK).exists()


def test_metrics_past_the_checkpoint_are_dropped_when_a_run_resumes(tmp_path):
    """A kill after step 7 with the last checkpoint at 5: the resumed run trains 6 and 7 again, so their old lines
    go (and a line torn by the kill with them); nothing is listed twice."""
    from sftkit.metricslog import keep_through

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 8)) + '{"step": 8, "lo')
    keep_through(path, 5)
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2, 3, 4, 5]


def test_reading_a_file_or_a_checkpoint_instead_of_the_run_says_which(tmp_path):
    path = finished_run(tmp_path / "run")
    (path / "checkpoint-2").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(UserError, match="is a file, not a run folder"):
        RunFolder(tmp_path / "notes.txt").read()
    with pytest.raises(UserError, match=f"inside the run '{path}' .*pass the run folder itself"):
        RunFolder(path / "checkpoint-2").read()
