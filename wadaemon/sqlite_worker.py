"""The snapshot worker: the only code that opens session databases, always in a child process.

The daemon process never opens a live SQLite session database: the WhatsApp client library links
its own SQLite, and POSIX advisory locks are per process, so any descriptor the daemon opened and
closed on the file would drop the client's locks. This module runs as
`python -m wadaemon.sqlite_worker COMMAND ...` and prints one JSON document on stdout.

    snapshot SRC DST   copy the account directory SRC into the empty directory DST: SQLite
                       databases through the online backup API (a consistent copy even while
                       another process writes) and checked with PRAGMA integrity_check; other
                       files read until two reads agree.
    check DIR          PRAGMA integrity_check on every SQLite database under DIR.
                       --immutable opens them as immutable (for private copies nobody writes).
    session DB         prepare a WhatsApp client database before the client opens it: switch it
                       to WAL mode (persistent; the client's SQLite honours it) and list the
                       paired devices. --create makes an empty WAL database if none exists.
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import sys
from pathlib import Path
from typing import Any
from urllib.parse import quote

SQLITE_MAGIC = b"SQLite format 3\x00"
SIDECAR_SUFFIXES = ("-wal", "-shm", "-journal")
STABLE_READ_ATTEMPTS = 5
BUSY_TIMEOUT_S = 10.0


class WorkerError(Exception):
    pass


def _is_sqlite(path: str) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(16) == SQLITE_MAGIC
    except OSError:
        return False


def _scan(root: str) -> tuple[list[tuple[str, str]], list[str]]:
    """(relative path, kind) of each file to copy, and warnings for what is skipped."""
    found: list[tuple[str, str]] = []
    warnings: list[str] = []
    for dirpath, dirs, files in os.walk(root):
        dirs.sort()
        sqlite_names = {n for n in files if _is_sqlite(os.path.join(dirpath, n))}
        for name in sorted(files):
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            try:
                st = os.lstat(full)
            except FileNotFoundError:
                continue
            if not stat.S_ISREG(st.st_mode):
                warnings.append(f"{rel}: not a regular file (symlink or special), not backed up")
                continue
            if any(name.endswith(s) and name[: -len(s)] in sqlite_names for s in SIDECAR_SUFFIXES):
                continue  # folded into its database by the backup API
            found.append((rel, "sqlite" if name in sqlite_names else "file"))
    return found, warnings


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


def _copy_file(src: str, dst: str) -> list[str]:
    """Copy a file that may be rewritten in place meanwhile: read until two reads agree."""
    with open(src, "rb") as fh:
        previous = fh.read()
    warnings: list[str] = []
    for _ in range(STABLE_READ_ATTEMPTS):
        with open(src, "rb") as fh:
            current = fh.read()
        if current == previous:
            break
        previous = current
    else:
        warnings.append("changed on every read; the last read was taken")
    with open(dst, "wb") as out:
        out.write(previous)
    return warnings


def snapshot(src_root: str, dst_root: str) -> dict[str, Any]:
    entries, warnings = _scan(src_root)
    files: list[dict[str, Any]] = []
    for rel, kind in entries:
        src = os.path.join(src_root, rel)
        dst = os.path.join(dst_root, rel)
        os.makedirs(os.path.dirname(dst), mode=0o700, exist_ok=True)
        try:
            mode = stat.S_IMODE(os.stat(src).st_mode)
            extra: dict[str, Any] = {}
            if kind == "sqlite":
                extra = _copy_sqlite(src, dst)
            else:
                warnings.extend(f"{rel}: {w}" for w in _copy_file(src, dst))
        except FileNotFoundError:
            continue  # deleted while we looked: it is not part of this snapshot
        except (sqlite3.Error, WorkerError, OSError) as exc:
            raise WorkerError(f"{rel}: {exc}") from None
        files.append({"path": rel, "kind": kind, "mode": mode, **extra})
    return {"files": files, "warnings": warnings}


def check(root: str, immutable: bool) -> dict[str, Any]:
    entries, _ = _scan(root)
    databases: list[str] = []
    corrupt: list[dict[str, str]] = []
    for rel, kind in entries:
        if kind != "sqlite":
            continue
        databases.append(rel)
        path = os.path.join(root, rel)
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
            out = snapshot(argv[1], argv[2])
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
        json.dump({"error": str(exc)}, sys.stdout)
        return 1
    json.dump(out, sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
