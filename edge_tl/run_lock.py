"""One writer per run directory: a lock file held for the whole of a writing command.

``with run_lock(run_dir):`` creates ``.<name>.lock`` beside the run directory (so replacing the
run directory, as ``finetune --force`` does, keeps it) with an atomic exclusive create
(``O_CREAT | O_EXCL``) holding the owner's pid and host. A second command on the same run
directory fails at once with :class:`~edge_tl.errors.RunLockedError` naming the owner. A lock
left by a dead process on this host is taken over. The lock is re-entrant within one process, so
``run_pipeline`` -> ``finetune`` -> ... take it once and nest.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Iterator

from edge_tl.errors import ArtifactError, RunLockedError

log = logging.getLogger(__name__)

_HELD: dict[Path, int] = {}  # lock files this process holds -> nesting depth
_GUARD = threading.Lock()


def lock_path(run_dir: str | os.PathLike) -> Path:
    """The lock file of a run directory: ``.<name>.lock`` in its parent."""
    run_dir = Path(run_dir).expanduser().resolve()
    return run_dir.parent / f".{run_dir.name}.lock"


def read_owner(path: Path) -> dict | None:
    """{"pid", "host"} of a lock file, or None when it is gone or unreadable (a writer mid-create)."""
    try:
        owner = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


def _is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _is_stale(owner: dict | None) -> bool:
    """A lock of a dead process on this host; a lock of another host is never judged stale."""
    if owner is None or owner.get("host") != socket.gethostname():
        return False
    return isinstance(owner.get("pid"), int) and not _is_alive(owner["pid"])


def _try_create(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as handle:
        json.dump({"pid": os.getpid(), "host": socket.gethostname()}, handle)
        handle.flush()
        os.fsync(handle.fileno())
    return True


def _take_over(path: Path, stale: dict) -> None:
    """Move a stale lock aside; if what moved is no longer that stale lock (another process took it over
    first), put it back."""
    aside = path.with_name(f"{path.name}.stale.{os.getpid()}")
    try:
        os.replace(path, aside)
    except FileNotFoundError:
        return
    if read_owner(aside) != stale:
        with contextlib.suppress(FileExistsError):
            os.link(aside, path)
    aside.unlink(missing_ok=True)
    log.warning("took over the lock %s of process %s on %s, which is gone", path, stale.get("pid"), stale.get("host"))


def _acquire(path: Path, run_dir: Path) -> None:
    for _ in range(3):
        if _try_create(path):
            return
        owner = read_owner(path)
        if _is_stale(owner):
            _take_over(path, owner)
            continue
        if owner is None:  # being written or just released: look again
            time.sleep(0.05)
            continue
        raise RunLockedError(
            f"run directory {run_dir} is in use by process {owner.get('pid')} on {owner.get('host')} "
            f"(lock {path}); wait for that command to finish, or delete the lock file if that process is gone")
    raise RunLockedError(f"run directory {run_dir} is being locked by another process (lock {path}); "
                         "retry when the other command has finished")


@contextlib.contextmanager
def run_lock(run_dir: str | os.PathLike) -> Iterator[Path]:
    """Hold ``run_dir``'s lock for the body (re-entrant in one process); yields the lock file's path.
    Parent folders created for the lock are removed again when they are left empty."""
    run_dir = Path(run_dir).expanduser().resolve()
    path = lock_path(run_dir)
    with _GUARD:
        if path in _HELD:
            _HELD[path] += 1
            nested = True
        else:
            nested = False
    if nested:
        try:
            yield path
        finally:
            with _GUARD:
                _HELD[path] -= 1
        return
    created = [parent for parent in [run_dir.parent, *run_dir.parent.parents] if not parent.exists()]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _acquire(path, run_dir)
    except OSError as err:
        _remove_empty(created)
        raise ArtifactError(f"cannot lock run directory {run_dir} ({err}); choose a writable --out") from err
    except RunLockedError:
        _remove_empty(created)
        raise
    with _GUARD:
        _HELD[path] = 1
    try:
        yield path
    finally:
        with _GUARD:
            del _HELD[path]
        path.unlink(missing_ok=True)
        _remove_empty(created)


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:  # deepest first
        with contextlib.suppress(OSError):
            folder.rmdir()
