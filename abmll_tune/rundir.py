"""One run per output directory: never overwrite a run, never share a directory.

A meta-training run owns its ``output_dir``. Before anything is written, the recipes

* refuse a directory that holds another run's checkpoints unless they resume it
  (``resume_from_checkpoint: true``) or replace it (``overwrite_output_dir: true``, which
  removes that run's checkpoints, logs and validation rows first, so nothing of two runs
  is mixed);
* take ``output_dir/.run.lock`` (process id, host, start time), created exclusively, so a
  second job started in the same directory is refused while the first lives; a lock
  left by a killed run (its process is gone) is recognised and taken over.

A full disk while writing ends the run with one line that names the directory and says
the last complete checkpoint is intact (checkpoints are written beside and renamed into
place, :func:`abmll_tune.io.atomic_directory`).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import time
from pathlib import Path

LOCK_NAME = ".run.lock"
# what a run leaves in its output_dir (the recipes' checkpoints, logs, validation rows)
RUN_ENTRIES = ("checkpoints", "logs", "validation.jsonl")


class RunDirError(RuntimeError):
    """The output directory cannot be used by this run (the message says what to do)."""


def _when(path: Path) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(path.stat().st_mtime))


def existing_run(output_dir: str | os.PathLike) -> str | None:
    """A description of the run whose checkpoints ``output_dir`` holds, or None."""
    root = Path(output_dir) / "checkpoints"
    found = (
        sorted(p for p in root.glob("*") if (p / "meta.json").is_file()) if root.is_dir() else []
    )
    if not found:
        return None
    latest = root / "latest"
    described = latest if (latest / "meta.json").is_file() else found[-1]
    try:
        progress = json.loads((described / "meta.json").read_text())["progress"]
        where = f"epoch {progress.get('epoch', '?')}, {progress.get('visits', '?')} task visits"
    except (OSError, ValueError, KeyError, TypeError):
        where = "progress unreadable"
    names = ", ".join(p.name for p in found)
    return f"checkpoints {names} (checkpoints/{described.name}: {where}, written {_when(described / 'meta.json')})"


def refuse_existing_run(output_dir: str | os.PathLike, *, resume: bool, overwrite: bool) -> None:
    """Raise :class:`RunDirError` if ``output_dir`` holds a run this one would overwrite."""
    if resume or overwrite:
        return
    found = existing_run(output_dir)
    if found is not None:
        raise RunDirError(
            f"output_dir {output_dir} holds another run ({found}): resume it with "
            "resume_from_checkpoint=true, choose another output_dir, or replace it with "
            "overwrite_output_dir=true"
        )


def clear_previous_run(output_dir: str | os.PathLike) -> list[str]:
    """Remove a previous run's checkpoints, logs and validation rows (overwrite); returns
    what was removed."""
    removed = []
    for name in RUN_ENTRIES:
        path = Path(output_dir) / name
        if path.is_dir():
            shutil.rmtree(path)
            removed.append(name)
        elif path.exists():
            path.unlink()
            removed.append(name)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


class RunLock:
    """``output_dir/.run.lock``, held while a run lives (:meth:`acquire`, :meth:`release`)."""

    def __init__(self, output_dir: str | os.PathLike):
        self.path = Path(output_dir) / LOCK_NAME
        self.took_over: dict | None = None  # the stale lock this one replaced, if any
        self._held = False

    def _write(self) -> None:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        with os.fdopen(fd, "w") as f:
            json.dump({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}, f)
        self._held = True

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._write()
            return self
        except FileExistsError:
            pass
        try:
            holder = json.loads(self.path.read_text())
            pid, host = int(holder["pid"]), str(holder["host"])
            since = time.strftime("%Y-%m-%d %H:%M", time.localtime(float(holder["started"])))
        except (OSError, ValueError, KeyError, TypeError):
            holder, pid, host, since = None, None, None, _when(self.path)
        if holder is not None and host == socket.gethostname() and not _alive(pid):
            self.path.unlink(missing_ok=True)  # a killed run's lock: take it over
            self.took_over = holder
            try:
                self._write()
                return self
            except FileExistsError:  # another job took it over first
                pass
        who = f"process {pid} on {host}" if holder is not None else "an unreadable lock"
        raise RunDirError(
            f"output_dir {self.path.parent} is in use by another run ({who}, since {since}): "
            "wait for it or choose another output_dir; if no run uses it, delete "
            f"{self.path}"
        )

    def release(self) -> None:
        if self._held:
            self.path.unlink(missing_ok=True)
            self._held = False


def is_disk_full(err: BaseException) -> bool:
    """An error of a write that found no space (OSError ENOSPC, or safetensors' wrapping)."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(err)
    return "No space left on device" in text or "os error 28" in text or "StorageFull" in text
