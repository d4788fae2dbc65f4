"""The run folder and its record: the one owner of `run.json` and of what may happen to a folder.

A run folder holds the LoRA adapter, the tokenizer, `run.json` (a RunRecord: arguments, backend, template,
tokens, data counts, metrics, memory, exports), `metrics.jsonl` and the trainer's `checkpoint-*` folders.
infer.py and memory_report.py read it back through RunFolder.read(); train_unsloth.py claims it (a lock, the
overwrite and resume rules), writes the record through RunFolder.save() and settles it with finish() / fail().
"""

import json
import logging
import os
import shutil
import socket
import tempfile
from pathlib import Path

from .errors import UserError
from .checkpoints import incomplete, step_of
from .ours import LOCK, foreign
from .runrecord import RECORD, RunRecord, damaged

log = logging.getLogger("sftkit")


class RunFolder:
    """One training run's folder: claim (lock + the overwrite/resume rules), begin, save, finish or fail."""

    def __init__(self, path):
        if not str(path or "").strip():  # Path("") would quietly mean the current folder
            raise UserError("no run folder given. Pass the --output_dir of a training run, e.g. outputs/RUN "
                            "(train_unsloth.py prints it at the end).")
        self.path = Path(path)
        self.replaced = None  # where --overwrite moved the previous run, until this one settles
        self._locked = False

    # -- reading ----------------------------------------------------------------------------------------------
    @property
    def record_path(self) -> Path:
        return self.path / RECORD

    def read(self) -> RunRecord:
        """The record, or a UserError that says what to pass instead."""
        if not self.path.is_dir():
            what = "is a file, not a run folder" if self.path.exists() else "does not exist"
            raise UserError(f"run folder {str(self.path)!r} {what}. Pass the --output_dir of a training run "
                            "(train_unsloth.py prints it at the end).")
        if not self.record_path.is_file() and (self.path.parent / RECORD).is_file():  # a checkpoint-N inside a run
            raise UserError(f"{str(self.path)!r} is a folder inside the run {str(self.path.parent)!r} (a checkpoint): "
                            f"pass the run folder itself, {str(self.path.parent)!r}.")
        if not self.record_path.is_file():
            raise UserError(f"{str(self.path)!r} has no {RECORD}, so it was not written by train_unsloth.py (or the "
                            "run never started). Pass a run folder that train_unsloth.py wrote (infer.py can also "
                            "take --model_name with --prompt for a plain model).")
        try:
            raw = json.loads(self.record_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise damaged(self.record_path, f"not valid JSON: {err}") from err
        return RunRecord.from_dict(raw, self.record_path)

    def exists(self) -> bool:
        return self.record_path.is_file()

    def checkpoints(self, quiet: bool = False) -> list[Path]:
        """Complete checkpoints, oldest first; a half-written one is skipped, with a log line."""
        if not self.path.is_dir():
            return []
        found = sorted((p for p in self.path.glob("checkpoint-*") if p.is_dir() and p.name[11:].isdigit()),
                       key=step_of)
        good = []
        for ckpt in found:
            why = incomplete(ckpt)
            if not why:
                good.append(ckpt)
            elif not quiet:
                log.info("skipping %s: %s (cut off by a kill or a full disk)", ckpt.name, why)
        return good

    def foreign(self) -> list[str]:
        """What in the folder sftkit did not write (the user's own files), inside its subfolders too."""
        return foreign(self.path)

    # -- claiming ---------------------------------------------------------------------------------------------
    def claim(self, overwrite: bool, resume: bool, max_steps: int = -1):
        """Takes the folder for a training run: the lock, then the overwrite / resume rules. Deletes nothing
        (see begin()). Returns the checkpoint to resume from, or None to start afresh."""
        if resume and overwrite:
            raise UserError("--resume and --overwrite contradict each other: resume continues the run in "
                            f"{self.path}, overwrite replaces it. Pass one of them.")
        self.lock()
        try:
            return self._rules(overwrite, resume, max_steps)
        except BaseException:
            self.unlock()
            raise

    def _rules(self, overwrite, resume, max_steps):
        out = str(self.path)
        has_record = self.exists()
        rec = self.read() if has_record and (resume or not overwrite) else None  # damaged: the read says so
        if resume:
            ckpts = self.checkpoints()
            if not ckpts:
                if has_record:
                    raise UserError(f"--resume: the run in {out!r} saved no complete checkpoint to resume from (it "
                                    "stopped before its first save, or --save_steps was 0). Start it again with "
                                    f"--overwrite{self._replaced_hint()}.")
                raise UserError(f"--resume: no checkpoint-* folder in {out!r} to resume from. Run without --resume "
                                "to start training.")
            done = (rec.metrics or {}).get("global_step") if rec else None
            if rec and rec.status == "finished" and (max_steps <= 0 or (done is not None and max_steps <= done)):
                asked = (f"--max_steps {max_steps} (given or recorded) is not above the {done} steps it trained, so "
                         "there is nothing to train" if max_steps > 0 else
                         "resuming would train past it and replace the adapter")
                raise UserError(f"{out!r} already finished at step {done}; {asked}. To train further pass a larger "
                                "--max_steps with --resume; to start again, --overwrite.")
            at = step_of(ckpts[-1])
            if 0 < max_steps < at:  # equal is fine: a run killed after its last checkpoint still gets finished
                raise UserError(f"--resume: --max_steps {max_steps} (given or recorded) is below the step of the run's "
                                f"newest checkpoint, {at}: there is nothing to train back to. Pass --max_steps {at} or "
                                "more.")
            return ckpts[-1]
        entries = [p for p in self.path.iterdir() if p.name != LOCK] if self.path.is_dir() else []
        if not entries:
            return None
        if overwrite:
            if not has_record:  # never delete what train_unsloth.py did not write
                raise UserError(f"--overwrite refused: {out!r} is not a run folder (no {RECORD}). Choose an empty or "
                                "new --output_dir.")
            if Path.cwd().resolve().is_relative_to(self.path.resolve()):
                raise UserError(f"--overwrite refused: {out!r} is the folder you are working in (or holds it). Pass "
                                "the run's folder by its name, e.g. --output_dir outputs/my-run.")
            theirs = self.foreign()
            if theirs:
                raise UserError(f"--overwrite refused: {out!r} holds files sftkit did not write: {', '.join(theirs)}. "
                                "Move them out of the folder (or choose another --output_dir), then retry.")
            self._no_leftover()
            return None
        if rec is not None and rec.status == "finished":
            raise UserError(f"{out!r} already holds a finished run. Pass --overwrite to replace it, or choose another "
                            "--output_dir.")
        if self.checkpoints(quiet=True):
            raise UserError(f"{out!r} holds an unfinished run with {self.checkpoints(quiet=True)[-1].name}. Pass "
                            "--resume to continue it, or --overwrite to start again.")
        if not has_record:  # --overwrite would be refused: never suggest it for files train_unsloth.py did not write
            raise UserError(f"{out!r} exists and holds files that are not a run (no {RECORD}). Choose an empty or new "
                            "--output_dir, e.g. outputs/my-run.")
        raise UserError(f"{out!r} exists and is not empty. Choose another --output_dir, or pass --overwrite to "
                        f"replace it{self._replaced_hint()}.")

    def _replaced_hint(self) -> str:
        old = self.replaced_path()
        if old.is_dir():
            return (f". The run an earlier --overwrite replaced is kept in {old}: to get it back, delete {self.path} "
                    f"and rename {old.name} to {self.path.name}")
        return ""

    def lock(self):
        """A second training into this folder while one runs is refused; a lock left by a killed process (its pid
        gone on this host) is taken over."""
        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"--output_dir {self.path} is a file, not a folder. Pass a folder for the run, e.g. "
                            "outputs/my-run.")
        lock = self.path / LOCK
        me = f"{socket.gethostname()} {os.getpid()}"
        for _ in range(2):
            try:
                self.path.mkdir(parents=True, exist_ok=True)
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                owner = lock.read_text(encoding="utf-8", errors="replace").strip() if lock.is_file() else ""
                if owner == me or self._stale(owner):
                    log.info("taking over %s left by a process that is gone (%s)", lock, owner or "unreadable")
                    lock.unlink(missing_ok=True)
                    continue
                raise UserError(f"{self.path} is in use by another training run (process {owner}). Wait for it to "
                                f"finish, or stop it; if it is gone, delete {lock}.")
            except OSError as err:  # read-only, no space, a parent that is a file, ...
                raise UserError(f"--output_dir {self.path} cannot be written ({err.strerror}). Pass a folder you can "
                                "write to, e.g. outputs/my-run.") from err
            with os.fdopen(fd, "w") as f:
                f.write(me)
            self._locked = True
            return
        raise UserError(f"could not take the lock {lock}; delete it if no training run uses {self.path}.")

    @staticmethod
    def _stale(owner: str) -> bool:
        host, _, pid = owner.partition(" ")
        if host != socket.gethostname() or not pid.isdigit():
            return not owner  # another machine's lock (a shared disk) is respected; an empty one is stale
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def unlock(self):
        if self._locked:
            (self.path / LOCK).unlink(missing_ok=True)
            self._locked = False

    # -- the lifecycle ----------------------------------------------------------------------------------------
    def replaced_path(self) -> Path:
        """Where --overwrite keeps the run it replaces: beside the real folder (a symlinked --output_dir too)."""
        real = self.path.resolve()
        return real.with_name(real.name + ".replaced")

    def _no_leftover(self) -> Path:
        old = self.replaced_path()
        if old.exists() and not (old / RECORD).is_file():  # not sftkit's: the user's own folder by that name
            raise UserError(f"--overwrite keeps the run it replaces in {old}, which already exists and is not a run "
                            f"(no {RECORD}). Nothing was changed: rename or move that folder, or choose another "
                            "--output_dir.")
        if old.exists():  # the run that replaced it has not finished yet: this may be the only finished copy
            raise UserError(f"{old} holds the run an earlier --overwrite of {str(self.path)!r} replaced; it is "
                            "deleted when the run that replaced it finishes (--resume it). Nothing was changed: "
                            "finish that run, or delete or move the folder, then retry.")
        return old

    def begin(self, record: RunRecord, fresh: bool):
        """Once data, model and trainer have loaded: a fresh run moves a previous one aside (never deleted before
        this run finishes), then the record is written with status running."""
        if fresh and self.exists():
            real = self.path.resolve()  # a symlinked folder: move what it points to, keep the link
            old = self._no_leftover()
            keep_lock = (real / LOCK).is_file()
            if keep_lock:
                (real / LOCK).unlink()
            real.rename(old)
            real.mkdir(parents=True, exist_ok=True)  # under torchrun another rank's Trainer may have made it
            if keep_lock:
                (real / LOCK).write_text(f"{socket.gethostname()} {os.getpid()}")
            self.replaced = old
            record.replaced = str(old)
        elif not fresh and self.exists():  # a resumed run finishes what the run it continues replaced
            record.replaced = self.read().replaced
        self.path.mkdir(parents=True, exist_ok=True)
        self.save(record)

    def save(self, record: RunRecord):
        """Writes run.json atomically: an interrupted write never leaves half a file."""
        fd, tmp = tempfile.mkstemp(dir=self.path, prefix=".run.", suffix=".json")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(record.to_dict(), f, ensure_ascii=False, indent=2, default=str)
        os.replace(tmp, self.record_path)

    def finish(self, record: RunRecord):
        """Saves the final record; a finished run drops the one it replaced (also after a later --resume)."""
        self.save(record)
        old = self.replaced_path()
        # Only the run this one (or the run it resumed) moved aside: a RUN.replaced from elsewhere is never touched.
        if record.status == "finished" and record.replaced == str(old) and (old / RECORD).is_file():
            shutil.rmtree(old)
            log.info("this run replaced the one in %s, now deleted", old)
        self.unlock()

    def fail(self, record: RunRecord, err: BaseException) -> str:
        """Records the failure; a run that saved no checkpoint puts the one it replaced back (nothing gained,
        nothing lost). Returns "restored", "kept" or ""."""
        record.status = "aborted" if isinstance(err, KeyboardInterrupt) else "failed"
        record.error = f"{type(err).__name__}: {err}"
        self.save(record)
        settled = ""
        old = self.replaced
        if old is not None and old.exists():
            if not self.checkpoints(quiet=True):
                real = self.path.resolve()
                shutil.rmtree(real)
                old.rename(real)
                log.info("the new run failed before its first checkpoint: the previous run is back in %s", self.path)
                settled = "restored"
            else:
                log.info("the previous run is kept in %s until this one is resumed and finishes", old)
                settled = "kept"
        self.unlock()
        return settled
