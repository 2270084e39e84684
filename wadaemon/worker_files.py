"""Opening files in account directories safely, for the snapshot worker: never through a
symlink, never blocking on a FIFO, and checking that SQLite opened the files that were checked."""

from __future__ import annotations

import errno
import os
import sqlite3
import stat

from wadaemon.errors import unreadable_message

SQLITE_MAGIC = b"SQLite format 3\x00"
SIDECAR_SUFFIXES = ("-wal", "-shm", "-journal")
BUSY_TIMEOUT_S = 10.0
OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# errors of an open that met a symlink, a FIFO with no writer, a device or a socket: not a file
NOT_A_FILE = (errno.ELOOP, errno.ENXIO, errno.ENODEV, errno.EOPNOTSUPP, errno.ENOTDIR)


class WorkerError(Exception):
    pass


class Unreadable(WorkerError):
    """The daemon's user may not read something in the account directory."""


class Replaced(WorkerError):
    """A file was replaced by something else (a symlink, another file) while it was copied."""


def _unreadable(path: str, exc: OSError) -> Unreadable:
    return Unreadable(unreadable_message(path, exc.strerror))


def _open_root(path: str) -> int:
    """A descriptor on the account directory itself; never through a symlink."""
    try:
        return os.open(path, DIR_FLAGS)
    except PermissionError as exc:
        raise _unreadable(path, exc) from None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise WorkerError(f"{path}: not a directory (a symlink, or a file); not used") from None
        raise WorkerError(f"{path}: {exc.strerror}") from None


def _open_beneath(root_fd: int, rel: str, flags: int) -> int:
    """Open `rel` (a relative path with '/' separators) under the directory `root_fd`, every
    component with O_NOFOLLOW: a directory swapped for a symlink on the way is not followed
    (the open fails with ELOOP or ENOTDIR)."""
    parts = rel.split("/")
    fd = root_fd
    try:
        for name in parts[:-1]:
            parent, fd = fd, os.open(name, DIR_FLAGS, dir_fd=fd)
            if parent != root_fd:
                os.close(parent)
        return os.open(parts[-1], flags, dir_fd=fd)
    finally:
        if fd != root_fd:
            os.close(fd)


def _open_regular(root_fd: int, rel: str) -> int | None:
    """A descriptor on `rel` under `root_fd` if it is a regular file; None for anything else.
    Never follows a symlink (on the way either) and never blocks (a FIFO opens at once and is
    refused)."""
    try:
        fd = _open_beneath(root_fd, rel, OPEN_FLAGS)
    except OSError as exc:
        if exc.errno in NOT_A_FILE:
            return None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    return fd


def _what(mode: int) -> str:
    """What a directory entry that is neither a regular file nor a directory is."""
    for test, name in (
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return name
    return "not a regular file"


Identity = tuple[int, int]  # (st_dev, st_ino)


def _identity(st: os.stat_result) -> Identity:
    return (st.st_dev, st.st_ino)


def _open_files() -> dict[int, Identity] | None:
    """The files this process has open, by descriptor; None if /proc cannot tell."""
    try:
        numbers = os.listdir("/proc/self/fd")
    except OSError:
        return None
    out: dict[int, Identity] = {}
    for n in numbers:
        try:
            out[int(n)] = _identity(os.stat(f"/proc/self/fd/{n}"))
        except (OSError, ValueError):
            continue  # the descriptor that listed the directory, closed since
    return out


_OPEN_ERRORS = {
    errno.ELOOP: "a symbolic link",
    errno.ENOTDIR: "under a symbolic link",
    errno.ENXIO: "a socket",
    errno.ENODEV: "a device",
    errno.EOPNOTSUPP: "a socket",
}


def _regular_stat(root_fd: int, rel: str) -> os.stat_result | None:
    """The stat of `rel` under `root_fd` if it is a regular file reached without following
    a symlink; None if it is absent. Raises Replaced if it is anything else."""
    try:
        fd = _open_beneath(root_fd, rel, OPEN_FLAGS)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno in NOT_A_FILE:
            what = _OPEN_ERRORS.get(exc.errno or 0, "not a regular file")
            raise Replaced(f"{rel}: {what}, not a regular file") from None
        raise
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    if not stat.S_ISREG(st.st_mode):
        raise Replaced(f"{rel}: {_what(st.st_mode)}, not a regular file")
    return st


def _regular_identity(root_fd: int, rel: str) -> Identity | None:
    st = _regular_stat(root_fd, rel)
    return None if st is None else _identity(st)


def _check_opened(before: dict[int, Identity] | None, allowed: set[Identity], rel: str) -> None:
    """Every file opened since `before` is one of `allowed`: SQLite opens by name, so a path
    swapped for a symlink between our check and its open would make it read another file."""
    if before is None:
        return
    now = _open_files() or {}
    for n, ident in now.items():
        if before.get(n) != ident and ident not in allowed:
            raise Replaced(
                f"{rel}: replaced while it was copied (a symlink, or another file); this "
                "copy is not used"
            )


def _connect(
    root_fd: int, rel: str, uri: str
) -> tuple[sqlite3.Connection, os.stat_result, dict[int, Identity] | None]:
    """Connect SQLite to the database `rel` under `root_fd`. SQLite opens files by name,
    following symlinks, and blocks on a FIFO: so the database and its -wal, -shm and -journal
    are first checked to be regular files (or absent) reached without a symlink, and the file
    SQLite opened (at once, before reading anything) is checked to be the database checked.
    Returns the connection, the database's stat and the files open before (for
    _check_opened); raises Replaced, or FileNotFoundError if the database is gone."""
    st = _regular_stat(root_fd, rel)
    if st is None:
        raise FileNotFoundError(rel)
    main = _identity(st)
    for suffix in SIDECAR_SUFFIXES:
        try:
            _regular_identity(root_fd, rel + suffix)
        except Replaced as exc:
            raise Replaced(
                f"{exc}: SQLite would open it with {rel}, so {rel} is not read until it is removed"
            ) from None
    before = _open_files()
    conn = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_S)
    try:
        _check_opened(before, {main}, rel)
    except BaseException:
        conn.close()
        raise
    return conn, st, before


def _devices(conn: sqlite3.Connection) -> int | None:
    """Paired devices in a WhatsApp client (whatsmeow) database; None for other databases."""
    if not conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type='table' AND name='whatsmeow_device'"
    ).fetchone():
        return None
    return int(conn.execute("SELECT count(*) FROM whatsmeow_device").fetchone()[0])
