"""The snapshot worker: the only code that opens session databases, always in a child process.

The daemon process never opens a live SQLite session database: the WhatsApp client library links
its own SQLite, and POSIX advisory locks are per process, so any descriptor the daemon opened and
closed on the file would drop the client's locks. This module runs as
`python -m wadaemon.sqlite_worker COMMAND ...` and prints one JSON document on stdout.

    snapshot SRC DST   copy the account directory SRC into the empty directory DST: SQLite
                       databases through the online backup API (a consistent copy even while
                       another process writes) and checked with PRAGMA integrity_check; other
                       files read until the copy is whole by their kind's test (file_kinds),
                       else reported torn and not copied. Options on stdin (JSON): "reuse",
                       {path: stat key} of files the caller already holds; a file whose stat
                       still matches is not read. Every file and directory comes with its mode
                       and numeric owner and group.
    check DIR          every file passes its kind's test: PRAGMA integrity_check for SQLite
                       databases, whole content for the others.
                       --immutable opens databases as immutable (for private copies).
    session DB         prepare a WhatsApp client database before the client opens it: switch it
                       to WAL mode (persistent; the client's SQLite honours it) and list the
                       paired devices. --create makes an empty WAL database if none exists.
"""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import stat
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

from wadaemon.errors import unreadable_message
from wadaemon.file_kinds import SQLITE, by_name, kind_of

SQLITE_MAGIC = b"SQLite format 3\x00"
SIDECAR_SUFFIXES = ("-wal", "-shm", "-journal")
BUSY_TIMEOUT_S = 10.0
# A file that is not whole (see file_kinds) is read again for this long before it is reported
# torn: a writer's truncate and write are usually a few milliseconds apart.
WHOLE_WITHIN_S = 0.5
REREAD_EVERY_S = 0.005
OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class WorkerError(Exception):
    pass


class Unreadable(WorkerError):
    """The daemon's user may not read something in the account directory."""


def _unreadable(path: str, exc: OSError) -> Unreadable:
    return Unreadable(unreadable_message(path, exc.strerror))


def _open_regular(path: str) -> int | None:
    """A descriptor on `path` if it is a regular file; None for anything else. Never follows a
    symlink and never blocks (a FIFO opens at once and is refused)."""
    try:
        fd = os.open(path, OPEN_FLAGS)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENXIO, errno.ENODEV, errno.EOPNOTSUPP):
            return None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    return fd


def _is_sqlite(path: str) -> bool:
    try:
        fd = _open_regular(path)
    except FileNotFoundError:
        return False
    except PermissionError as exc:
        raise _unreadable(path, exc) from None
    if fd is None:
        return False
    try:
        return os.pread(fd, 16, 0) == SQLITE_MAGIC
    finally:
        os.close(fd)


def _overflow_id(kind: str) -> int:
    """The id the kernel shows for an owner unmapped in this user namespace (systemd's
    PrivateUsers=): such an owner is unknown here, not user 65534."""
    try:
        with open(f"/proc/sys/kernel/overflow{kind}") as fh:
            return int(fh.read())
    except (OSError, ValueError):
        return 65534


OVERFLOW_UID, OVERFLOW_GID = _overflow_id("uid"), _overflow_id("gid")


def _owner(st: os.stat_result) -> dict[str, int | None]:
    return {
        "mode": stat.S_IMODE(st.st_mode),
        "uid": None if st.st_uid == OVERFLOW_UID else st.st_uid,
        "gid": None if st.st_gid == OVERFLOW_GID else st.st_gid,
    }


def _stat_key(st: os.stat_result) -> list[int]:
    """What must be unchanged for an earlier copy of a file to stand for it (see backup.py)."""
    return [
        st.st_size,
        st.st_mtime_ns,
        st.st_ino,
        stat.S_IMODE(st.st_mode),
        st.st_uid,
        st.st_gid,
    ]


def _scan(
    root: str, unchanged: dict[str, list[int]] | None = None
) -> tuple[list[tuple[str, str]], list[dict[str, Any]], list[str]]:
    """(relative path, kind) of each file to copy, the directories (owner and mode, the account
    directory itself as "."), and warnings for what is skipped. Raises Unreadable if a directory
    cannot be listed: an unreadable directory must never look empty. A file whose stat key is
    `unchanged[path]` is not opened to look for a SQLite header: it was no database then."""
    unchanged = unchanged or {}
    found: list[tuple[str, str]] = []
    dirs: list[dict[str, Any]] = []
    warnings: list[str] = []

    def walk(rel: str) -> None:
        full = os.path.join(root, rel) if rel else root
        try:
            dirs.append({"path": rel or ".", **_owner(os.stat(full, follow_symlinks=False))})
            with os.scandir(full) as it:
                entries = sorted(it, key=lambda e: e.name)
        except PermissionError as exc:
            raise _unreadable(full, exc) from None
        except FileNotFoundError:
            return

        def known(e: os.DirEntry[str]) -> bool:
            rel_path = f"{rel}/{e.name}" if rel else e.name
            key = unchanged.get(rel_path)
            try:
                return key is not None and _stat_key(e.stat(follow_symlinks=False)) == key
            except FileNotFoundError:
                return False  # deleted meanwhile: _is_sqlite says no, the copy skips it

        sqlite_names = {
            e.name
            for e in entries
            if e.is_file(follow_symlinks=False) and not known(e) and _is_sqlite(e.path)
        }
        for e in entries:
            erel = f"{rel}/{e.name}" if rel else e.name
            if e.is_dir(follow_symlinks=False):
                walk(erel)
                continue
            if not e.is_file(follow_symlinks=False):
                warnings.append(f"{erel}: not a regular file (symlink or special), not backed up")
                continue
            if any(
                e.name.endswith(s) and e.name[: -len(s)] in sqlite_names for s in SIDECAR_SUFFIXES
            ):
                continue  # folded into its database by the backup API
            found.append((erel, SQLITE if e.name in sqlite_names else kind_of(erel).name))

    walk("")
    return found, dirs, warnings


def _integrity(conn: sqlite3.Connection) -> str:
    rows = [r[0] for r in conn.execute("PRAGMA integrity_check").fetchall()]
    return "ok" if rows == ["ok"] else "; ".join(str(r) for r in rows[:5])


def _copy_sqlite(src: str, dst: str) -> dict[str, Any]:
    source = sqlite3.connect(f"file:{quote(src)}", uri=True, timeout=BUSY_TIMEOUT_S)
    try:
        source.execute("PRAGMA query_only=1")
        target = sqlite3.connect(dst)
        try:
            source.backup(target)
            result = _integrity(target)
            page_size = int(target.execute("PRAGMA page_size").fetchone()[0])
            devices = _devices(target) if result == "ok" else None
        finally:
            target.close()
    finally:
        source.close()
    if result != "ok":
        raise WorkerError(f"the copy fails PRAGMA integrity_check: {result}")
    return {"page_size": page_size, "devices": devices}


def _devices(conn: sqlite3.Connection) -> int | None:
    """Paired devices in a WhatsApp client (whatsmeow) database; None for other databases."""
    if not conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type='table' AND name='whatsmeow_device'"
    ).fetchone():
        return None
    return int(conn.execute("SELECT count(*) FROM whatsmeow_device").fetchone()[0])


def _read_whole(path: str, kind: str) -> tuple[bytes, os.stat_result, str | None]:
    """Read a file that its writer may be rewriting in place, until the copy is whole: the file
    did not change while it was read and the content passes its kind's test. Gives up after
    WHOLE_WITHIN_S and returns why the last read is not whole."""
    torn = by_name(kind).torn
    deadline = time.monotonic() + WHOLE_WITHIN_S
    while True:
        fd = _open_regular(path)
        if fd is None:
            raise FileNotFoundError(path)  # replaced by something else: not part of this copy
        try:
            before = os.fstat(fd)
            chunks = []
            while chunk := os.read(fd, 1 << 20):
                chunks.append(chunk)
            after = os.fstat(fd)
        finally:
            os.close(fd)
        data = b"".join(chunks)
        why: str | None = None
        if (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns) or len(
            data
        ) != after.st_size:
            why = "changed while it was read"
        else:
            why = torn(data)
        if why is None or time.monotonic() >= deadline:
            return data, before, why
        time.sleep(REREAD_EVERY_S)


def snapshot(src_root: str, dst_root: str, reuse: dict[str, list[int]]) -> dict[str, Any]:
    """Copy an account directory. A file whose stat matches `reuse[path]` is not read (the
    caller holds its content); a file that stays torn is reported, not copied."""
    entries, dirs, warnings = _scan(src_root, reuse)
    files: list[dict[str, Any]] = []
    for rel, kind in entries:
        src = os.path.join(src_root, rel)
        dst = os.path.join(dst_root, rel)
        try:
            if kind != SQLITE and rel in reuse:
                st = os.stat(src, follow_symlinks=False)
                if _stat_key(st) == reuse[rel]:
                    files.append({"path": rel, "kind": kind, "status": "reused", **_owner(st)})
                    continue
            os.makedirs(os.path.dirname(dst), mode=0o700, exist_ok=True)
            if kind == SQLITE:
                st = os.stat(src, follow_symlinks=False)
                extra = _copy_sqlite(src, dst)
                files.append({"path": rel, "kind": kind, "status": "copied", **_owner(st), **extra})
                continue
            data, st, why = _read_whole(src, kind)
            record = {"path": rel, "kind": kind, **_owner(st), "stat": _stat_key(st)}
            if why is not None:
                files.append({**record, "status": "torn", "torn": why})
                continue
            with open(dst, "xb") as out:
                out.write(data)
            files.append({**record, "status": "copied"})
        except FileNotFoundError:
            continue  # deleted while we looked: it is not part of this snapshot
        except PermissionError as exc:
            raise _unreadable(src, exc) from None
        except (sqlite3.Error, WorkerError, OSError) as exc:
            raise WorkerError(f"{rel}: {exc}") from None
    return {"files": files, "dirs": dirs, "warnings": warnings}


def check(root: str, immutable: bool) -> dict[str, Any]:
    """Every file passes its kind's test: integrity_check for databases, whole content for the
    others (read again for a moment if a writer is rewriting it)."""
    entries, _, _ = _scan(root)
    databases: list[str] = []
    corrupt: list[dict[str, str]] = []
    for rel, kind in entries:
        path = os.path.join(root, rel)
        if kind != SQLITE:
            try:
                _, _, why = _read_whole(path, kind)
            except FileNotFoundError:
                continue
            except PermissionError as exc:
                raise _unreadable(path, exc) from None
            if why is not None:
                corrupt.append({"path": rel, "detail": why})
            continue
        databases.append(rel)
        uri = f"file:{quote(path)}" + ("?immutable=1" if immutable else "")
        try:
            conn = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_S)
            try:
                conn.execute("PRAGMA query_only=1")
                result = _integrity(conn)
            finally:
                conn.close()
        except sqlite3.Error as exc:
            result = str(exc)
        if result != "ok":
            corrupt.append({"path": rel, "detail": result})
    return {"files": len(entries), "databases": databases, "corrupt": corrupt}


def session(path: str, create: bool) -> dict[str, Any]:
    """WAL mode and the paired devices of a whatsmeow database (before the client opens it)."""
    if not os.path.exists(path) and not create:
        return {"exists": False, "journal_mode": None, "devices": []}
    os.umask(0o077)
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S)
    try:
        mode = str(conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]).lower()
        devices: list[dict[str, str]] = []
        has_table = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type='table' AND name='whatsmeow_device'"
        ).fetchone()
        if has_table:
            for jid, push_name in conn.execute("SELECT jid, push_name FROM whatsmeow_device"):
                devices.append({"jid": str(jid), "push_name": str(push_name or "")})
    finally:
        conn.close()
    return {"exists": True, "journal_mode": mode, "devices": devices}


def main(argv: list[str]) -> int:
    try:
        if len(argv) == 3 and argv[0] == "snapshot":
            if not Path(argv[1]).is_dir():
                raise WorkerError(f"{argv[1]}: not a directory")
            options = json.loads(sys.stdin.read() or "{}")
            out = snapshot(argv[1], argv[2], options.get("reuse", {}))
        elif len(argv) in (2, 3) and argv[0] == "check":
            out = check(argv[1], immutable="--immutable" in argv[2:])
        elif len(argv) in (2, 3) and argv[0] == "session":
            out = session(argv[1], create="--create" in argv[2:])
        else:
            raise WorkerError(
                "usage: snapshot SRC DST | check DIR [--immutable] | session DB [--create]; "
                f"got {argv}"
            )
    except WorkerError as exc:
        json.dump({"error": str(exc), "unreadable": isinstance(exc, Unreadable)}, sys.stdout)
        return 1
    json.dump(out, sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
