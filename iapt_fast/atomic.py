"""Saves that a crash cannot lose: at every instant a saved folder holds the old contents or
the new ones, complete (design.md §8).

* A folder that does not exist yet is built next to its destination (``.name.tmp-*``),
  flushed to disk and renamed into place: one rename, atomic on POSIX and Windows.
* A folder that exists is updated in place by a roll-forward commit. The new files are
  written into ``folder/.iapt-stage-*`` and flushed; then a commit record
  (``folder/.iapt-commit.json``, naming the stage and its files) is written by rename: that
  rename is the commit point. The staged files are then renamed over the old ones, the record
  is deleted and the stage removed. Readers open files through :func:`committed_file`: while
  a record exists, a file still in the stage is the new one, so they see the old set before
  the commit point and the new set from it on, whichever step a crash interrupted. The next
  save into the folder finishes a commit a dead writer left, and every save removes the
  stages, temporary files and moved-aside folders dead writers left behind.

This works on every file system with an atomic rename and keeps the on-disk layout plain
(``adapter_config.json`` and ``adapter_model.safetensors`` side by side), including in a run
folder whose checkpoints must stay where they are. One folder has one writer at a time.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Any, Iterator, Sequence

__all__ = ["atomic_directory", "atomic_files", "atomic_write_bytes", "atomic_write_text", "committed_file", "fsync_tree",
           "remove_tree", "remove_leftovers", "COMMIT_NAME"]

COMMIT_NAME = ".iapt-commit.json"
STAGE_PREFIX = ".iapt-stage-"
# Staging folders a killed per-file writer can leave in a run folder: removed like our own stages.
_LEGACY_STAGE_PREFIX = ".files.tmp-"


def fsync_tree(path: str) -> None:
    """Flush every file under ``path`` (and the folders) to disk."""
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(root)


def _fsync_dir(path: str) -> None:
    with contextlib.suppress(OSError):  # not every platform can open a folder
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


# ------------------------------------------------------------------------------ reading
def _read_commit(directory: str) -> dict[str, Any] | None:
    """The pending commit record of ``directory``, or None."""
    try:
        with open(os.path.join(directory, COMMIT_NAME), encoding="utf-8") as fh:
            record = json.load(fh)
    except (OSError, ValueError):
        return None
    if (not isinstance(record, dict) or not isinstance(record.get("stage"), str)
            or not record["stage"].startswith(STAGE_PREFIX) or os.sep in record["stage"]
            or not isinstance(record.get("files"), list)
            or not all(isinstance(f, str) and f not in ("", ".", "..") and os.sep not in f for f in record["files"])):
        return None
    return record


def committed_file(directory: str | os.PathLike, name: str) -> str:
    """The path a reader should open for file ``name`` of a folder saved by this module.

    ``directory/name``, unless a commit into ``directory`` is pending (its writer died, or is
    still renaming) and ``name`` is still in its stage: that staged file is then the current one.
    """
    directory = os.fspath(directory)
    record = _read_commit(directory)
    if record is not None and name in record["files"]:
        staged = os.path.join(directory, record["stage"], name)
        if os.path.exists(staged):
            return staged
    return os.path.join(directory, name)


# ------------------------------------------------------------------------------ writing
def _apply(directory: str, record: dict[str, Any]) -> None:
    """Roll a recorded commit forward; each step may be repeated after a crash."""
    stage = os.path.join(directory, record["stage"])
    for name in record["files"]:
        src = os.path.join(stage, name)
        if os.path.lexists(src):
            os.replace(src, os.path.join(directory, name))
    _fsync_dir(directory)
    for name in record.get("remove", []):
        if isinstance(name, str) and name and not name.startswith(".") and os.sep not in name:
            _remove(os.path.join(directory, name))
    os.remove(os.path.join(directory, COMMIT_NAME))
    _fsync_dir(directory)
    shutil.rmtree(stage, ignore_errors=True)


def _recover(directory: str) -> None:
    """Finish the commit a dead writer left in ``directory`` and drop its unfinished stages."""
    record = _read_commit(directory)
    if record is not None and os.path.isdir(os.path.join(directory, record["stage"])):
        _apply(directory, record)
    elif os.path.lexists(os.path.join(directory, COMMIT_NAME)):
        os.remove(os.path.join(directory, COMMIT_NAME))  # unreadable, or its stage is gone: applied
    for entry in os.listdir(directory):
        if entry.startswith((STAGE_PREFIX, _LEGACY_STAGE_PREFIX, f"{COMMIT_NAME}.tmp-")):
            _remove(os.path.join(directory, entry))


@contextlib.contextmanager
def _commit_into(directory: str, names: Sequence[str] | None) -> Iterator[str]:
    """Yield a stage inside the existing ``directory``; on success its files replace
    ``names`` (or, for None, the whole folder's visible contents) by a roll-forward commit."""
    _recover(directory)
    stage = tempfile.mkdtemp(prefix=STAGE_PREFIX, dir=directory)
    try:
        yield stage
        if names is None:
            files = sorted(os.listdir(stage))
            folders = [f for f in files if os.path.isdir(os.path.join(stage, f))]
            if folders:
                raise ValueError(f"atomic save into existing {directory!r}: only files can be replaced, "
                                 f"got folders {folders}")
            remove = sorted(e for e in os.listdir(directory) if not e.startswith(".") and e not in files)
        else:
            _check_written(stage, names)
            files, remove = list(names), []
        fsync_tree(stage)
        record = {"stage": os.path.basename(stage), "files": files, "remove": remove}
        atomic_write_text(os.path.join(directory, COMMIT_NAME), json.dumps(record) + "\n")
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    # Committed: from here on readers see the new files, and an interrupted apply is finished
    # by the next save.
    _apply(directory, record)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[str]:
    """Yield an empty folder to fill; on success its files become ``path``'s contents.

    A missing ``path`` appears complete by one rename. An existing one is replaced by a
    roll-forward commit (its visible entries not written anew are deleted; only files can
    replace an existing folder's). On an exception nothing at ``path`` changes.
    """
    path = os.path.abspath(os.fspath(path))
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    if os.path.isdir(path):
        with _commit_into(path, None) as stage:
            yield stage
    else:
        if os.path.lexists(path):
            raise NotADirectoryError(f"cannot save a folder to {path!r}: it exists and is not a folder")
        tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
        try:
            yield tmp
            fsync_tree(tmp)
            os.replace(tmp, path)
            _fsync_dir(parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    remove_leftovers(parent, name)


@contextlib.contextmanager
def atomic_files(directory: str | os.PathLike, names: Sequence[str]) -> Iterator[str]:
    """Yield a folder to write ``names`` into; on success they replace those of ``directory``
    together, and every other entry of ``directory`` (a run's checkpoints) stays.

    A missing ``directory`` appears by one rename; an existing one gets the files by a
    roll-forward commit. On an exception (or a missing file) nothing in ``directory`` changes.
    """
    directory = os.path.abspath(os.fspath(directory))
    if os.path.isdir(directory):
        with _commit_into(directory, names) as stage:
            yield stage
        remove_leftovers(*os.path.split(directory))
        return
    with atomic_directory(directory) as tmp:
        yield tmp
        _check_written(tmp, names)


def _check_written(tmp: str, names: Sequence[str]) -> None:
    missing = [n for n in names if not os.path.isfile(os.path.join(tmp, n))]
    if missing:
        raise RuntimeError(f"atomic save: {missing} were not written")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old or the new file, never a part."""
    path = os.fspath(path)
    directory, name = os.path.split(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    remove_leftovers(directory, name)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.tmp-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(directory)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` (UTF-8) so that readers see the old or the new file, never a part."""
    atomic_write_bytes(path, text.encode("utf-8"))


def remove_tree(path: str | os.PathLike) -> None:
    """Delete folder ``path``: first moved aside (``.name.old-*``) by one rename, so a crash
    never leaves it half deleted under its own name; the next save removes what remains."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        return
    parent, name = os.path.split(path)
    aside = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
    os.rmdir(aside)
    os.replace(path, aside)
    shutil.rmtree(aside, ignore_errors=True)


def remove_leftovers(parent: str | os.PathLike, name: str) -> None:
    """Delete what dead writers of ``parent/name`` left: ``.name.tmp-*`` and ``.name.old-*``
    (``name`` may be a glob pattern such as ``checkpoint-*``)."""
    import fnmatch

    parent = os.fspath(parent)
    try:
        entries = os.listdir(parent)
    except OSError:
        return
    for entry in entries:
        if not entry.startswith("."):
            continue
        head, sep, tail = entry[1:].rpartition(".")
        if sep and tail.startswith(("tmp-", "old-")) and fnmatch.fnmatchcase(head, name):
            _remove(os.path.join(parent, entry))
