"""Capturing a WAL-mode database by what changed, in the snapshot worker (see wal_image.py).

A capture is either full (every page, the image checked with PRAGMA integrity_check in memory)
or a delta from a position the daemon holds committed pieces for: only the pieces (fixed runs of
pages) holding a page written since are read and sent back. Each answer gives the new
position. A database not in WAL mode, or a WAL this reader cannot use, is left to the
backup-API copy (capture returns why instead).
"""

from __future__ import annotations

import contextlib
import os
import struct
from typing import Any
from urllib.parse import quote

from wadaemon.db_image import opened_image
from wadaemon.wal_image import NotWal, PageReader, Position, WalState, advance, read_header
from wadaemon.worker_files import (
    SIDECAR_SUFFIXES,
    WorkerError,
    _check_opened,
    _connect,
    _devices,
    _identity,
    _open_regular,
)

# the WAL state of each database this worker read, by path: the next capture reads only the
# frames appended since (a worker that starts again reads the whole WAL once)
_STATES: dict[str, WalState] = {}
ATTEMPTS = 3  # captures taken again when the WAL restarts during one


def _integrity(image: bytes) -> tuple[str, int | None]:
    """PRAGMA integrity_check of a database image, and its paired devices."""
    # an image in WAL mode (header bytes 18-19 are 2) cannot be opened from memory
    with opened_image(image[:18] + b"\x01\x01" + image[20:]) as conn:
        rows = [r[0] for r in conn.execute("PRAGMA integrity_check").fetchall()]
        result = "ok" if rows == ["ok"] else "; ".join(str(r) for r in rows[:5])
        return result, _devices(conn)


Captured = tuple[dict[str, Any], dict[str, bytes], os.stat_result]


def capture(
    root_fd: int, rel: str, src: str, since: dict[str, Any] | None, piece_size: int
) -> Captured | str:
    """The database `rel` (under `root_fd`, at `src`) as of its last commit: full, or the
    pieces changed since `since` ({"wal": position, "pages": its size in pages}). Returns the
    answer's fields, the payloads (by piece number, "" for a full image) and the database's
    stat; or why this reader cannot take it ("" when the database is not in WAL mode): the
    caller then copies it with the backup API."""
    try:
        conn, st, before = _connect(root_fd, rel, f"file:{quote(src)}")
    except FileNotFoundError:
        raise FileNotFoundError(src) from None
    main = _identity(st)
    fds: list[int] = []
    try:
        conn.execute("PRAGMA query_only=1")
        if str(conn.execute("PRAGMA journal_mode").fetchone()[0]).lower() != "wal":
            return ""
        page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
        if piece_size % page_size:
            return f"its page size {page_size} does not divide the piece size {piece_size}"
        conn.execute("BEGIN")
        # the read transaction: no checkpoint copies a frame past it into the database file
        schema = int(conn.execute("PRAGMA schema_version").fetchone()[0])
        row = conn.execute(
            "SELECT rootpage FROM sqlite_master WHERE type='table' AND name='whatsmeow_device'"
        ).fetchone()
        db_fd = _open_regular(root_fd, rel)
        if db_fd is None or _identity(os.fstat(db_fd)) != main:
            raise WorkerError(f"{rel}: replaced while it was read; this copy is not used")
        fds.append(db_fd)
        wal_fd = None
        with contextlib.suppress(FileNotFoundError):
            wal_fd = _open_regular(root_fd, rel + "-wal")
        if wal_fd is not None:
            fds.append(wal_fd)
        # stat, never open and close: closing any descriptor on the -shm or the database
        # would drop the locks this process's SQLite holds on it (POSIX), the read lock too
        allowed = {main}
        for suffix in SIDECAR_SUFFIXES:
            with contextlib.suppress(FileNotFoundError):
                allowed.add(_identity(os.stat(src + suffix, follow_symlinks=False)))
        _check_opened(before, allowed, rel)
        for _ in range(ATTEMPTS):
            try:
                out = _read(src, main, db_fd, wal_fd, page_size, since, piece_size, schema, row)
            except NotWal as exc:
                _STATES.pop(src, None)
                return str(exc)
            header = read_header(wal_fd) if wal_fd is not None else None
            if (header or b"") == _STATES[src].header:
                conn.execute("COMMIT")
                return (*out, st)
            _STATES.pop(src, None)  # the WAL restarted under the capture: taken again
        raise WorkerError(f"{rel}: its WAL restarted {ATTEMPTS} times during one capture")
    finally:
        conn.close()  # first: closing our descriptors drops the connection's locks
        for fd in fds:
            os.close(fd)


def _read(
    src: str,
    ident: tuple[int, int],
    db_fd: int,
    wal_fd: int | None,
    page_size: int,
    since: dict[str, Any] | None,
    piece_size: int,
    schema: int,
    device_root: tuple[int] | None,
) -> tuple[dict[str, Any], dict[str, bytes]]:
    state = advance(_STATES.get(src), ident, wal_fd, page_size)
    _STATES[src] = state
    reader = PageReader(state, db_fd, wal_fd)
    per_piece = piece_size // page_size
    position: Position = state.position()
    fields: dict[str, Any] = {"page_size": page_size, "pages": reader.pages, "wal": position}
    changed = state.changed_since(tuple(since["wal"])) if since else None
    first = reader.page(1)
    if changed is None or struct.unpack(">I", first[40:44])[0] != schema:
        image = reader.span(1, reader.pages)
        result, devices = _integrity(image)
        if result != "ok":
            raise NotWal(f"the image read from the WAL fails integrity_check: {result}")
        return {**fields, "status": "copied", "checked": True, "devices": devices}, {"": image}
    base_pages = int(since["pages"]) if since else 0
    pieces = {(p - 1) // per_piece for p in changed if p <= reader.pages}
    if base_pages != reader.pages:  # the size changed: the last pieces of either size
        last = (reader.pages - 1) // per_piece if reader.pages else -1
        pieces |= set(range((min(base_pages, reader.pages) - 1) // per_piece, last + 1))
        pieces.discard(-1)
    pieces = {k for k in pieces if k * per_piece < reader.pages}
    payloads = {str(k): reader.span(k * per_piece + 1, per_piece) for k in sorted(pieces)}
    devices = reader.rows_in(device_root[0]) if device_root else None
    # the pages of those pieces that differ from the base: written since, or past its end
    dirty = sorted(
        p
        for k in pieces
        for p in range(k * per_piece + 1, min((k + 1) * per_piece, reader.pages) + 1)
        if p in changed or p > base_pages
    )
    delta = {
        "status": "delta",
        "checked": False,
        "devices": devices,
        "pieces": sorted(pieces),
        "dirty": dirty,
    }
    return fields | delta, payloads
