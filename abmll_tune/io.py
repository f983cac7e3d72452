"""Small file helpers: every write goes to a temporary file that is renamed into place,
so an interrupted or failed run never leaves a half-written file behind."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _file_mode() -> int:
    # temporary files are created 0600; give finished outputs the usual umask-based mode
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (same-directory temp file + ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


COMPLETE_SUFFIX = ".complete"


@contextmanager
def atomic_directory(path: str | os.PathLike, *, replace: bool = True) -> Iterator[Path]:
    """Build a directory under a temporary sibling name and rename it to ``path`` on success.

    An existing ``path`` is replaced (when ``replace``) only after the new one is
    complete; on any error the temporary directory is removed and ``path`` is untouched.

    Replacing a directory takes two renames (old out of the way, new into place). A
    process killed between them would leave no ``path`` at all, so a marker file
    ``.{name}.XXXX.complete`` is written beside the finished temporary directory before
    the first rename and removed after the second: :func:`recover_directory` then
    completes an interrupted swap (or discards an unfinished build) at the next start.
    """
    path = Path(path)
    if path.exists() and not replace:
        raise FileExistsError(f"{path} exists")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    marker = tmp.with_name(tmp.name + COMPLETE_SUFFIX)
    try:
        tmp.chmod(0o755)  # mkdtemp makes 0700; outputs are meant to be shared
        yield tmp
        mode = _file_mode()
        for file in tmp.rglob("*"):
            if file.is_file():
                file.chmod(mode)
        _fsync_tree(tmp)
        if path.exists():
            marker.touch()
            _fsync_dir(path.parent)
            trash = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
            os.replace(path, trash / "old")
            os.replace(tmp, path)
            marker.unlink()
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        marker.unlink(missing_ok=True)
        raise


def recover_directory(path: str | os.PathLike) -> list[str]:
    """Finish or clean up what an interrupted :func:`atomic_directory` left beside ``path``.

    * ``path`` missing and a finished new version marked complete: the swap was cut
      between its two renames, so the new version is renamed into place;
    * every other temporary sibling (an unfinished build, the old version set aside,
      a stale marker) is removed.

    Returns what was done, one line each (empty when there was nothing to do).
    """
    path = Path(path)
    parent, prefix = path.parent, f".{path.name}."
    if not parent.is_dir():
        return []
    done = []
    siblings = sorted(p for p in parent.iterdir() if p.name.startswith(prefix))
    markers = [p for p in siblings if p.name.endswith(COMPLETE_SUFFIX) and p.is_file()]
    finished = [m.with_name(m.name[: -len(COMPLETE_SUFFIX)]) for m in markers]
    finished = [d for d in finished if d.is_dir() and not d.name.startswith(prefix + "old.")]
    if not path.exists() and finished:
        newest = max(finished, key=lambda d: d.stat().st_mtime)
        os.replace(newest, path)
        done.append(f"completed an interrupted replacement of {path}")
    for p in siblings:
        if not p.exists():
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        done.append(f"removed the stale temporary {p}")
    if done:
        _fsync_dir(parent)
    return done


def _fsync_dir(path: Path) -> None:
    """Persist a directory's entries (renames) where the platform allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for file in root.rglob("*"):
        if file.is_file():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
