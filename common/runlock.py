"""One process per run directory: an exclusive OS advisory lock (flock) on `<run dir>/.lock`.

The lock is held by an open file description for the life of the run, so the kernel releases it when
the process ends in any way (a SIGKILL included): there is never a stale lock to clean up, and a run
killed a moment ago can be resumed at once. The lock file holds the holder's PID and host, for the
message a second process gets. The lock file is never deleted (deleting it while another process has
it open would let two processes hold two different locks).

Within one process the lock is re-entrant (a test, or a retry after a crash, runs a script's `main`
again on the same directory in the same process); it is released by `release` at the end of a run,
or by the process's death.

flock is per host on local file systems; on NFS, Linux emulates it with the server's byte-range locks
(NFSv4 and NFSv3 with lockd), so it also holds across the nodes of a cluster. A requeued SLURM task
starts after the old one has died, so it finds the lock free.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from pathlib import Path

from common.errors import UserError

LOCK_NAME = ".lock"
_held: dict[str, int] = {}  # real path of a run directory -> fd of its lock file, held by this process


def _key(run_dir: Path) -> str:
    return os.path.realpath(run_dir)


def unwritable(run_dir: Path, e: OSError) -> str:
    return (f"cannot write to the run directory {run_dir} ({e.strerror or e}): make it writable "
            f"(e.g. chmod -R u+w {run_dir}), or copy the run to a writable place and point --run-dir there")


def _holder(fd: int) -> str:
    """Who holds the lock, as its file says: the holder writes its PID right after locking, so wait a
    moment for a holder that has just won the lock."""
    text = ""
    for _ in range(50):
        text = os.pread(fd, 200, 0).decode(errors="replace").strip()
        if text:
            break
        time.sleep(0.01)
    pid, _, host = text.partition(" ")
    if not pid:
        return "PID unknown: it has not written it yet"
    return f"PID {pid}" + (f" on {host}" if host and host != socket.gethostname() else "")


def acquire(run_dir: str | os.PathLike) -> None:
    """Lock the existing directory `run_dir` for this process, or raise one UserError: another process
    holds it (naming its PID), or the directory cannot be written (checked by writing a file in it)."""
    d = Path(run_dir)
    if _key(d) in _held:
        return
    path = d / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise UserError(unwritable(d, e)) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = _holder(fd) if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN) else None
        os.close(fd)
        if holder is None:
            raise UserError(f"cannot lock the run directory {d} ({path}: {e.strerror or e})") from None
        raise UserError(f"{d} is in use by another process ({holder}): one run directory takes one process at a "
                        "time, a second would clobber the first's files. Wait for it to end (or stop it), then run "
                        "this again; or choose another --run-dir.") from None
    try:
        probe = d / ".write-test"  # the lock file may exist already in a directory made read-only since
        probe.write_text("ok")
        probe.unlink()
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
    except OSError as e:
        os.close(fd)
        raise UserError(unwritable(d, e)) from None
    _held[_key(d)] = fd


def release(run_dir: str | os.PathLike) -> None:
    """Release this process's lock on `run_dir` (a no-op if it holds none)."""
    fd = _held.pop(_key(Path(run_dir)), None)
    if fd is not None:
        os.close(fd)  # closing the only descriptor of the lock releases it


def holder(run_dir: str | os.PathLike) -> str | None:
    """Who holds `run_dir`'s lock ("PID 123"), or None when no other process does. Writes nothing."""
    path = Path(run_dir) / LOCK_NAME
    if _key(Path(run_dir)) in _held:
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None  # no lock file: no run has started there
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return _holder(fd)
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
