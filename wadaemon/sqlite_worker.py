"""The snapshot worker: the only code that opens session databases, always in a child process.

The daemon process never opens a live SQLite session database: the WhatsApp client library links
its own SQLite, and POSIX advisory locks are per process, so any descriptor the daemon opened and
closed on the file would drop the client's locks. This module runs as
`python -m wadaemon.sqlite_worker COMMAND ...` and prints one JSON document on stdout, or as
`python -m wadaemon.sqlite_worker serve`, a long-lived worker answering one request after the
other (worker_pool.py: the daemon's way, with no interpreter start per backup).

    snapshot SRC DST   copy the account directory SRC into the empty directory DST: SQLite
                       databases through the online backup API (a consistent copy even while
                       another process writes) and checked with PRAGMA integrity_check; other
                       files read until the copy is whole by their kind's test (file_kinds),
                       else reported torn and not copied. Options on stdin (JSON): "reuse",
                       {path: stat key} of files the caller already holds; a file whose stat
                       still matches is not read. Every file and directory comes with its mode
                       and numeric owner and group; what is neither (symlinks, FIFOs, sockets,
                       devices) is listed as skipped, never opened. With the option
                       "inline" the copies are made in memory and sent back after the answer
                       (serve only): nothing is written to disk.
    check DIR          every file passes its kind's test: PRAGMA integrity_check for SQLite
                       databases, whole content for the others.
                       --immutable opens databases as immutable (for private copies).
    session DB         prepare a WhatsApp client database before the client opens it: switch it
                       to WAL mode (persistent; the client's SQLite honours it) and list the
                       paired devices. --create makes an empty WAL database if none exists.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import sqlite3
import stat
import sys
import time
from typing import Any
from urllib.parse import quote

from wadaemon.db_image import image_of
from wadaemon.file_kinds import SQLITE, by_name, kind_of
from wadaemon.wal_capture import capture
from wadaemon.worker_files import (
    BUSY_TIMEOUT_S,
    DIR_FLAGS,
    NOT_A_FILE,
    SIDECAR_SUFFIXES,
    SQLITE_MAGIC,
    Replaced,
    Unreadable,
    WorkerError,
    _check_opened,
    _connect,
    _devices,
    _identity,
    _open_regular,
    _open_root,
    _regular_identity,
    _unreadable,
    _what,
)

# A file that is not whole (see file_kinds) is read again for this long before it is reported
# torn: a writer's truncate and write are usually a few milliseconds apart.
WHOLE_WITHIN_S = 0.5
REREAD_EVERY_S = 0.005
PIECE_SIZE = 64 * 1024  # the daemon says which (file_entries.PIECE_SIZE)


def _is_sqlite(dir_fd: int, name: str, path: str) -> bool:
    try:
        fd = _open_regular(dir_fd, name)
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
    root: str, root_fd: int, unchanged: dict[str, list[int]] | None = None
) -> tuple[list[tuple[str, str]], list[dict[str, Any]], list[list[str]]]:
    """(relative path, kind) of each file to copy, the directories (owner and mode, the account
    directory itself as "."), and [relative path, what it is] of each entry skipped because it
    is neither a regular file nor a directory. Directories are opened and listed through
    descriptors, never through a symlink. Raises Unreadable if a directory cannot be listed: an
    unreadable directory must never look empty. A file whose stat key is `unchanged[path]` is
    not opened to look for a SQLite header: it was no database then."""
    unchanged = unchanged or {}
    found: list[tuple[str, str]] = []
    dirs: list[dict[str, Any]] = []
    skipped: list[list[str]] = []

    def walk(dir_fd: int, rel: str) -> None:
        full = os.path.join(root, rel) if rel else root
        try:
            dirs.append({"path": rel or ".", **_owner(os.fstat(dir_fd))})
            with os.scandir(dir_fd) as it:
                entries = sorted(it, key=lambda e: e.name)
        except PermissionError as exc:
            raise _unreadable(full, exc) from None

        def known(e: os.DirEntry[str]) -> bool:
            key = unchanged.get(f"{rel}/{e.name}" if rel else e.name)
            try:
                return key is not None and _stat_key(e.stat(follow_symlinks=False)) == key
            except FileNotFoundError:
                return False  # deleted meanwhile: _is_sqlite says no, the copy skips it

        sqlite_names = {
            e.name
            for e in entries
            if e.is_file(follow_symlinks=False)
            and not known(e)
            and _is_sqlite(dir_fd, e.name, os.path.join(full, e.name))
        }
        for e in entries:
            erel = f"{rel}/{e.name}" if rel else e.name
            if e.is_dir(follow_symlinks=False):
                try:
                    sub = os.open(e.name, DIR_FLAGS, dir_fd=dir_fd)
                except PermissionError as exc:
                    raise _unreadable(os.path.join(full, e.name), exc) from None
                except OSError as exc:
                    if exc.errno in NOT_A_FILE or exc.errno == errno.ENOENT:
                        continue  # replaced or deleted while we looked: not in this copy
                    raise
                try:
                    walk(sub, erel)
                finally:
                    os.close(sub)
                continue
            if not e.is_file(follow_symlinks=False):
                try:
                    mode = os.stat(e.name, dir_fd=dir_fd, follow_symlinks=False).st_mode
                except FileNotFoundError:
                    continue
                skipped.append([erel, _what(mode)])
                continue
            if any(
                e.name.endswith(s) and e.name[: -len(s)] in sqlite_names for s in SIDECAR_SUFFIXES
            ):
                continue  # folded into its database by the backup API
            found.append((erel, SQLITE if e.name in sqlite_names else kind_of(erel).name))

    walk(root_fd, "")
    return found, dirs, skipped


def _integrity(conn: sqlite3.Connection) -> str:
    rows = [r[0] for r in conn.execute("PRAGMA integrity_check").fetchall()]
    return "ok" if rows == ["ok"] else "; ".join(str(r) for r in rows[:5])


def _copy_sqlite(
    root_fd: int, rel: str, src: str, dst: str | None
) -> tuple[dict[str, Any], os.stat_result, bytes | None]:
    """Copy a database with the online backup API (opened by _connect), into the file `dst`,
    or into memory (dst None; see db_image). Every file SQLite opened is then checked to be the
    database, its -wal/-shm/-journal (regular files) or the copy: anything else refuses the
    copy (Replaced). Returns what the copy says (page size, paired devices), the stat of the
    database copied and the copy's bytes when it was made in memory."""
    try:
        source, st, before = _connect(root_fd, rel, f"file:{quote(src)}")
    except FileNotFoundError:
        raise FileNotFoundError(src) from None
    main = _identity(st)
    try:
        source.execute("PRAGMA query_only=1")
        target = sqlite3.connect(dst if dst is not None else ":memory:")
        data: bytes | None = None
        try:
            source.backup(target)
            allowed = {main}
            for path in (rel + s for s in SIDECAR_SUFFIXES):
                ident = _regular_identity(root_fd, path)
                if ident is not None:
                    allowed.add(ident)
            if dst is not None:
                for path in (dst, *(dst + s for s in SIDECAR_SUFFIXES)):
                    with contextlib.suppress(FileNotFoundError):
                        allowed.add(_identity(os.stat(path, follow_symlinks=False)))
            _check_opened(before, allowed, rel)
            if _regular_identity(root_fd, rel) != main:
                raise Replaced(f"{rel}: replaced while it was copied; this copy is not used")
            result = _integrity(target)
            page_size = int(target.execute("PRAGMA page_size").fetchone()[0])
            devices = _devices(target) if result == "ok" else None
            if dst is None and result == "ok":
                data = image_of(target)
        finally:
            target.close()
    finally:
        source.close()
    if result != "ok":
        raise WorkerError(f"the copy fails PRAGMA integrity_check: {result}")
    return {"page_size": page_size, "devices": devices}, st, data


def _read_whole(root_fd: int, rel: str, kind: str) -> tuple[bytes, os.stat_result, str | None]:
    """Read a file that its writer may be rewriting in place, until the copy is whole: the file
    did not change while it was read and the content passes its kind's test. Gives up after
    WHOLE_WITHIN_S and returns why the last read is not whole."""
    torn = by_name(kind).torn
    deadline = time.monotonic() + WHOLE_WITHIN_S
    while True:
        fd = _open_regular(root_fd, rel)
        if fd is None:
            raise FileNotFoundError(rel)  # replaced by something else: not part of this copy
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


def snapshot(
    src_root: str,
    dst_root: str,
    reuse: dict[str, list[int]],
    inline: bool = False,
    since: dict[str, dict[str, Any]] | None = None,
    piece_size: int = PIECE_SIZE,
) -> tuple[dict[str, Any], dict[str, bytes]]:
    """Copy an account directory. A file whose stat matches `reuse[path]` is not read (the
    caller holds its content); a file that stays torn is reported, not copied. With `inline`,
    the copies are made in memory and returned by path (nothing is written under dst_root)."""
    root_fd = _open_root(src_root)
    try:
        return _snapshot(src_root, root_fd, dst_root, reuse, inline, since or {}, piece_size)
    finally:
        os.close(root_fd)


def _snapshot(
    src_root: str,
    root_fd: int,
    dst_root: str,
    reuse: dict[str, list[int]],
    inline: bool,
    since: dict[str, dict[str, Any]],
    piece_size: int,
) -> tuple[dict[str, Any], dict[str, bytes]]:
    entries, dirs, skipped = _scan(src_root, root_fd, reuse)
    files: list[dict[str, Any]] = []
    copies: dict[str, bytes] = {}
    warnings: list[str] = []
    for rel, kind in entries:
        src = os.path.join(src_root, rel)
        dst = os.path.join(dst_root, rel)
        try:
            if kind != SQLITE and rel in reuse:
                st = os.stat(src, follow_symlinks=False)
                if _stat_key(st) == reuse[rel]:
                    files.append({"path": rel, "kind": kind, "status": "reused", **_owner(st)})
                    continue
            if not inline:
                os.makedirs(os.path.dirname(dst), mode=0o700, exist_ok=True)
            if kind == SQLITE:
                captured = capture(root_fd, rel, src, since.get(rel), piece_size) if inline else ""
                if not isinstance(captured, str):
                    fields, pieces, st = captured
                    for key, data in pieces.items():
                        copies[f"{rel}#{key}" if key else rel] = data
                    files.append({"path": rel, "kind": kind, **_owner(st), **fields})
                    continue
                extra, st, copy = _copy_sqlite(root_fd, rel, src, None if inline else dst)
                if captured:  # the WAL reader failed where the backup API did not: say so
                    warnings.append(f"{rel}: copied with the backup API: {captured}")
                if copy is not None:
                    copies[rel] = copy
                files.append(
                    {"path": rel, "kind": kind, "status": "copied", "checked": True}
                    | _owner(st)
                    | extra
                )
                continue
            data, st, why = _read_whole(root_fd, rel, kind)
            record = {"path": rel, "kind": kind, **_owner(st), "stat": _stat_key(st)}
            if why is not None:
                files.append({**record, "status": "torn", "torn": why})
                continue
            if inline:
                copies[rel] = data
            else:
                with open(dst, "xb") as out:
                    out.write(data)
            files.append({**record, "status": "copied"})
        except FileNotFoundError:
            continue  # deleted while we looked: it is not part of this snapshot
        except PermissionError as exc:
            raise _unreadable(src, exc) from None
        except Replaced:
            raise
        except (sqlite3.Error, WorkerError, OSError) as exc:
            raise WorkerError(f"{rel}: {exc}") from None
    return {"files": files, "dirs": dirs, "skipped": skipped, "warnings": warnings}, copies


def check(root: str, immutable: bool) -> dict[str, Any]:
    """Every file passes its kind's test: integrity_check for databases, whole content for the
    others (read again for a moment if a writer is rewriting it)."""
    root_fd = _open_root(root)
    try:
        return _check(root, root_fd, immutable)
    finally:
        os.close(root_fd)


def _check(root: str, root_fd: int, immutable: bool) -> dict[str, Any]:
    entries, _, _ = _scan(root, root_fd)
    databases: list[str] = []
    corrupt: list[dict[str, str]] = []
    for rel, kind in entries:
        path = os.path.join(root, rel)
        if kind != SQLITE:
            try:
                _, _, why = _read_whole(root_fd, rel, kind)
            except FileNotFoundError:
                continue
            except PermissionError as exc:
                raise _unreadable(path, exc) from None
            if why is not None:
                corrupt.append({"path": rel, "detail": why})
            continue
        uri = f"file:{quote(path)}" + ("?immutable=1" if immutable else "")
        try:
            conn = _connect(root_fd, rel, uri)[0]
        except FileNotFoundError:
            continue
        except sqlite3.Error as exc:
            conn, result = None, str(exc)
        databases.append(rel)
        if conn is not None:
            try:
                conn.execute("PRAGMA query_only=1")
                result = _integrity(conn)
            except sqlite3.Error as exc:
                result = str(exc)
            finally:
                conn.close()
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


def run(argv: list[str], options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, bytes]]:
    """One command: its answer, and the copies made in memory (snapshot with "inline")."""
    if len(argv) == 3 and argv[0] == "snapshot":
        inline = bool(options.get("inline"))
        since = options.get("since", {})
        piece_size = int(options.get("piece_size", PIECE_SIZE))
        return snapshot(argv[1], argv[2], options.get("reuse", {}), inline, since, piece_size)
    if len(argv) in (2, 3) and argv[0] == "check":
        return check(argv[1], immutable="--immutable" in argv[2:]), {}
    if len(argv) in (2, 3) and argv[0] == "session":
        return session(argv[1], create="--create" in argv[2:]), {}
    raise WorkerError(
        "usage: snapshot SRC DST | check DIR [--immutable] | session DB [--create] | serve; "
        f"got {argv}"
    )


def _failure(exc: WorkerError) -> dict[str, Any]:
    return {"error": str(exc), "unreadable": isinstance(exc, Unreadable)}


def serve() -> int:
    """Answer requests from stdin until it ends (see worker_pool.py for the protocol)."""
    # Ctrl-C in a terminal reaches the whole process group: the daemon stops on it and still
    # needs its workers for the final backups (they exit when their input ends)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    out = sys.stdout.buffer
    for line in sys.stdin.buffer:
        request = json.loads(line)
        try:
            answer, copies = run([request["command"], *request["args"]], request["options"])
        except WorkerError as exc:
            answer, copies = _failure(exc), {}
        except (sqlite3.Error, OSError) as exc:  # outside any file: the request itself failed
            answer, copies = _failure(WorkerError(str(exc))), {}
        answer["payloads"] = [{"path": p, "size": len(d)} for p, d in copies.items()]
        out.write(json.dumps(answer).encode() + b"\n")
        for data in copies.values():
            out.write(data)
        out.flush()
    return 0


def main(argv: list[str]) -> int:
    if argv == ["serve"]:
        return serve()
    try:
        out, _ = run(argv, json.loads(sys.stdin.read() or "{}") if argv[:1] == ["snapshot"] else {})
    except WorkerError as exc:
        json.dump(_failure(exc), sys.stdout)
        return 1
    json.dump(out, sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
