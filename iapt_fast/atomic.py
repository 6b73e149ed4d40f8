"""Writes that a crash cannot tear: nothing a user saved is lost by a failed save.

Every file is written in full next to its destination (same file system), flushed to disk,
and only then renamed into place; a rename is atomic on POSIX and Windows.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Iterator, Sequence

__all__ = ["atomic_directory", "atomic_files", "atomic_write_text", "fsync_tree"]


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


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary sibling folder; on success it becomes ``path`` by one rename.

    An existing ``path`` is replaced (moved aside, then deleted). On an exception the
    temporary folder is removed and ``path`` is left as it was.
    """
    path = os.path.abspath(os.fspath(path))
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
    try:
        yield tmp
        fsync_tree(tmp)
        old = None
        if os.path.exists(path):
            old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
            os.rmdir(old)
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_files(directory: str | os.PathLike, names: Sequence[str]) -> Iterator[str]:
    """Yield a folder to write ``names`` into; on success they replace those of ``directory``.

    When ``directory`` is missing or holds nothing but ``names``, the whole folder is swapped
    by rename (config and weights change together). A folder that also holds other things
    (a training run's output folder with its checkpoints) keeps them: each file is renamed
    into place, in the order of ``names``, once all of them are complete on disk. Either
    way a failure while writing leaves ``directory`` exactly as it was.
    """
    directory = os.path.abspath(os.fspath(directory))
    alone = not os.path.exists(directory) or all(
        entry in names for entry in os.listdir(directory) if not entry.startswith("."))
    if alone:
        with atomic_directory(directory) as tmp:
            yield tmp
            _check_written(tmp, names)
        return
    tmp = tempfile.mkdtemp(prefix=".files.tmp-", dir=directory)
    try:
        yield tmp
        _check_written(tmp, names)
        fsync_tree(tmp)
        for name in names:
            os.replace(os.path.join(tmp, name), os.path.join(directory, name))
        _fsync_dir(directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_written(tmp: str, names: Sequence[str]) -> None:
    missing = [n for n in names if not os.path.isfile(os.path.join(tmp, n))]
    if missing:
        raise RuntimeError(f"atomic save: {missing} were not written")


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` (UTF-8) so that readers see the old or the new file, never a part."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
