"""Atomic output: a conversion writes into a staging folder that becomes ``OUT`` only when whole.

``with staged_output(out) as stage:`` gives ``OUT.partial-<pid>`` (next to ``OUT``) to
write into. Leaving the block normally fsyncs every file and the folder and renames it
to ``OUT`` in one ``os.rename``; an exception removes it, or, for a failed check
(:class:`CheckFailed`), keeps it as ``OUT.failed-<pid>`` for inspection. A killed
process leaves only ``OUT.partial-<pid>``, which never looks like a checkpoint (its
name is not ``OUT``) and which the next run clears once that pid is gone. An ``OUT``
that exists is refused before anything is written.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil

from ..config import ConfigError

__all__ = ["CheckFailed", "check_output_free", "check_space", "free_bytes", "staged_output"]


class CheckFailed(RuntimeError):
    """A written output failed its verification: kept as ``OUT.failed-<pid>``, never committed."""


def check_output_free(out: str, key: str = "--save") -> None:
    """``out`` must not exist yet (an empty folder is taken); its parent must be writable."""
    if os.path.exists(out) and not (os.path.isdir(out) and not os.listdir(out)):
        raise ConfigError(key, f"{out} exists: choose a new output folder (nothing is written over)")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise ConfigError(key, f"{parent} does not exist: create it first")
    if not os.access(parent, os.W_OK):
        raise ConfigError(key, f"{parent} is not writable")


def free_bytes(path: str) -> int:
    st = os.statvfs(os.path.dirname(os.path.abspath(path)))
    return st.f_bavail * st.f_frsize


def check_space(out: str, nbytes: int, key: str = "--save") -> None:
    need, have = int(nbytes * 1.1), free_bytes(out)
    if need > have:
        raise ConfigError(key, f"{os.path.dirname(os.path.abspath(out))} has {have / 1e9:.2f} GB free, the output"
                               f" needs about {need / 1e9:.2f} GB: free space or write elsewhere")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clear_stale(out: str) -> list[str]:
    """Remove ``OUT.partial-<pid>`` folders of processes that are gone; the removed paths."""
    removed = []
    for path in glob.glob(glob.escape(os.path.abspath(out)) + ".partial-*"):
        m = re.search(r"\.partial-(\d+)$", path)
        if m and not _alive(int(m.group(1))):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _fsync_tree(root: str) -> None:
    for d, _, files in os.walk(root):
        for f in files:
            fd = os.open(os.path.join(d, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def staged_output(out: str, key: str = "--save", *, say=print):
    """Yield a staging folder; commit it as ``out`` on success (see the module doc)."""
    out = os.path.abspath(out)
    check_output_free(out, key)
    for path in clear_stale(out):
        say(f"removed {path} (left by an interrupted run)")
    stage = f"{out}.partial-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    os.makedirs(stage)
    try:
        yield stage
    except CheckFailed:
        failed = f"{out}.failed-{os.getpid()}"
        shutil.rmtree(failed, ignore_errors=True)
        os.rename(stage, failed)
        say(f"the output failed its check: kept for inspection as {failed} ({out} was not written)")
        raise
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    _fsync_tree(stage)
    if os.path.isdir(out):  # the empty folder check_output_free allowed
        os.rmdir(out)
    os.rename(stage, out)
    fd = os.open(os.path.dirname(out), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
