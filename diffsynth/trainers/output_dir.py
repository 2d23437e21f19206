"""One run owns its --output_path: a lock with the pid and host, no silent mixing with another run's files,
temp files of killed runs removed, and a log that has each step once after a resume."""
import csv
import glob
import json
import os
import shutil
import socket
import tempfile
import time

LOCK = ".lock"
# What a run writes into its folder (the conditioning cache is content-keyed and shared on purpose: kept).
RUN_FILES = ("*.safetensors", "*.nonfinite", "train_log.csv", "loss.png")
RUN_FOLDERS = ("checkpoints", "validation", "tensorboard", "wandb", "swanlog")


class OutputDirError(ValueError):
    """The output folder cannot be used by this run; the message says why and what to do."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _read_lock(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def previous_run_files(folder) -> list[str]:
    """Checkpoints, logs and states of an earlier run in `folder` (names relative to it)."""
    found = [os.path.basename(p) for pattern in RUN_FILES
             for p in glob.glob(os.path.join(glob.escape(folder), pattern))]
    found += [name + "/" for name in RUN_FOLDERS if os.path.isdir(os.path.join(folder, name))]
    return sorted(found)


def cannot_create_in(folder):
    """Why no file can be created in the existing `folder` (its strerror), or None. A file is created and removed:
    os.access answers yes to root everywhere, also on a read-only mount or in /proc, where the run would fail."""
    try:
        with tempfile.NamedTemporaryFile(prefix=".tmp-probe-", dir=folder):
            pass
    except OSError as e:
        return e.strerror or type(e).__name__
    return None


def check_output_path(path):
    """An output path that can never work (a file, or under a file) is an error before anything loads."""
    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise OutputDirError(f"--output_path {path} is a file, not a folder; name a folder (it is created if missing)")
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise OutputDirError(f"--output_path {path}: {parent} is a file, so the folder cannot be created there")
    why = cannot_create_in(parent)
    if why:
        raise OutputDirError(f"--output_path {path}: cannot create files in {parent} ({why}); choose another folder")


class OutputDir:
    """Claim `path` for this run (main process only): take the lock, refuse another run's leftovers unless
    resuming or overwriting, clean temp files of killed runs. With --overwrite the leftovers go only when
    `remove_previous_run()` is called (once the run's models have loaded), and never when one of them is an input of
    this run (`inputs`: [(flag, path)]). `release()` gives the lock back."""

    def __init__(self, path, resume: bool, overwrite: bool, inputs: list | None = None):
        self.path = os.path.abspath(path)
        self.lock = os.path.join(self.path, LOCK)
        self.held = False
        self.previous = []
        check_output_path(self.path)
        try:
            os.makedirs(self.path, exist_ok=True)
        except OSError as e:
            raise OutputDirError(f"--output_path {self.path}: cannot create the folder ({e.strerror})") from e
        self._take_lock()
        try:
            leftovers = previous_run_files(self.path)
            if leftovers and not resume:
                if not overwrite:
                    shown = ", ".join(leftovers[:6]) + (f" and {len(leftovers) - 6} more" if len(leftovers) > 6 else "")
                    raise OutputDirError(
                        f"--output_path {self.path} holds another run's files ({shown}). Continue that run with "
                        "--resume_from_checkpoint latest, pass --overwrite to delete them and start anew, or choose "
                        "another --output_path")
                for flag, given in inputs or ():
                    given = os.path.abspath(given) if given else None
                    if given and any(given == os.path.join(self.path, n.rstrip("/"))
                                     or n.endswith("/") and given.startswith(os.path.join(self.path, n))
                                     for n in leftovers):
                        raise OutputDirError(
                            f"--overwrite would delete {flag} {given}: it is one of the earlier run's files in "
                            f"--output_path {self.path}. Copy it elsewhere and pass that copy, or choose another "
                            "--output_path")
                self.previous = leftovers
            self.removed_temp = self._remove_temp_files()
        except BaseException:
            self.release()
            raise

    def _take_lock(self):
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(2):
            try:
                fd = os.open(self.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                other = _read_lock(self.lock)
                same_host = other.get("host") == me["host"]
                if same_host and isinstance(other.get("pid"), int) and not _alive(other["pid"]):
                    os.remove(self.lock)  # its run was killed: a stale lock
                    continue
                raise OutputDirError(
                    f"--output_path {self.path} is in use by another training run (pid {other.get('pid', '?')} on "
                    f"host {other.get('host', '?')}, started {other.get('started', '?')}; lock file {self.lock}). "
                    "Wait for it to finish or choose another --output_path; if that run is dead (e.g. on another "
                    "machine), delete the lock file")
            except OSError as e:
                raise OutputDirError(f"--output_path {self.path}: cannot write there ({e.strerror})") from e
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return

    def remove_previous_run(self) -> list[str]:
        """--overwrite: delete the earlier run's files (names relative to the folder; none without --overwrite)."""
        removed, self.previous = self.previous, []
        for name in removed:
            path = os.path.join(self.path, name.rstrip("/"))
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        return removed

    def _remove_temp_files(self) -> list[str]:
        """Temporary files of writes that a killed run never finished (atomic_path's `.tmp-*`, state `*.tmp`)."""
        stale = glob.glob(os.path.join(glob.escape(self.path), "**", ".tmp-*"), recursive=True)
        stale += glob.glob(os.path.join(glob.escape(self.path), "checkpoints", "*.tmp"))
        stale += glob.glob(os.path.join(glob.escape(self.path), "*.tmp.png"))
        for path in stale:
            shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)
        return sorted(os.path.relpath(p, self.path) for p in stale)

    def release(self):
        if self.held and _read_lock(self.lock).get("pid") == os.getpid():
            os.remove(self.lock)
        self.held = False


def trim_log(log_path, last_step: int) -> float:
    """Keep the log's rows up to `last_step` (the resumed state's step): the steps after it run again. Returns the
    last kept row's seconds, from which the resumed run counts on (0 without one)."""
    if not os.path.isfile(log_path):
        return 0.0
    with open(log_path, newline="") as f:
        rows = list(csv.reader(f))
    kept = rows[:1] + [r for r in rows[1:] if r and r[0].isdigit() and int(r[0]) <= last_step]
    if len(kept) < len(rows):
        from ..utils.io import atomic_path

        with atomic_path(log_path) as tmp, open(tmp, "w", newline="") as f:
            csv.writer(f).writerows(kept)
    try:
        return float(kept[-1][-1]) if len(kept) > 1 else 0.0
    except ValueError:
        return 0.0


def claim(path, resume: bool, overwrite: bool, accelerator, inputs: list | None = None) -> OutputDir | None:
    """OutputDir on the main process; every process learns whether that worked (so none waits forever)."""
    import torch

    error, owner = None, None
    if accelerator.is_main_process:
        try:
            owner = OutputDir(path, resume, overwrite, inputs)
        except OutputDirError as e:
            error = e
    failed = accelerator.reduce(torch.tensor([float(error is not None)], device=accelerator.device), reduction="sum")
    if error is not None:
        raise error
    if failed.item() > 0:
        raise OutputDirError(f"--output_path {path}: the main process refused it (its message says why)")
    return owner
