"""A captured file as a manifest entry: its pieces, named by keyed hashes, and what decides
whether its content changed.

Files are cut into pieces of PIECE_SIZE bytes (a multiple of every SQLite page size, so pieces
are page-aligned and a change of a few pages rebuilds a few pieces). A file captured whole
(status "copied") is cut here; a database captured by what changed (status "delta",
wal_capture.py) keeps the pieces of its entry in the generation the capture was asked from and
replaces those the worker read again.

SQLite databases get no whole-file SHA-256 (hashing a whole database for a one-row change cost
more than the change): their content is fixed by their ordered piece ids, which are keyed
hashes checked as each piece is read back (Replica.read_piece). What decides whether a database
changed (content_sha) is a hash over its piece ids, the first one taken with the volatile
header fields masked (first_masked, kept in the entry: a delta that did not touch the first
piece reuses it).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence

from wadaemon.errors import WadaemonError
from wadaemon.keyring import Key
from wadaemon.manifest import FileEntry
from wadaemon.snapshot import Snapshot, SnapshotFile

# A multiple of every SQLite page size (512 B to 64 KiB), so pieces are page-aligned. Smaller
# pieces upload less per change (a one-row change touches 1-5 pages); larger ones mean fewer
# documents per full backup.
PIECE_SIZE = 64 * 1024
# SQLite header fields that differ between two copies of the same content (file change counter,
# schema cookie, version-valid-for): masked when deciding whether anything changed.
_SQLITE_VOLATILE = ((24, 28), (40, 44), (92, 96))
PIECES_SHA = "p:"  # content_sha made from piece ids (see sqlite_content_sha)


class BaseMismatch(WadaemonError):
    """A delta cannot be applied to the entry it was asked from (the caller reads in full)."""


def masked_first(key: Key, first: bytes) -> str:
    """The keyed hash of a database's first piece with its volatile header fields masked."""
    masked = bytearray(first)
    for start, end in _SQLITE_VOLATILE:
        if len(masked) >= end:
            masked[start:end] = bytes(end - start)
    return key.piece_id(bytes(masked))


def sqlite_content_sha(first_masked: str, ids: Sequence[str]) -> str:
    h = hashlib.sha256(first_masked.encode())
    for piece_id in ids[1:]:
        h.update(b"\0" + piece_id.encode())
    return PIECES_SHA + h.hexdigest()


def copied_entry(key: Key, f: SnapshotFile, data: bytes) -> FileEntry:
    view = memoryview(data)
    ids = tuple(key.piece_id(view[o : o + PIECE_SIZE]) for o in range(0, len(data), PIECE_SIZE))
    first = ""
    if f.kind == "sqlite":
        first = masked_first(key, data[:PIECE_SIZE])
        sha256, content = "", sqlite_content_sha(first, ids)
    else:
        sha256 = hashlib.sha256(data).hexdigest()
        content = sha256
    return FileEntry(
        path=f.path,
        kind=f.kind,
        mode=f.owner.mode,
        size=len(data),
        sha256=sha256,
        pieces=ids,
        uid=f.owner.uid,
        gid=f.owner.gid,
        content_sha=content,
        checked=f.checked,
        piece_size=PIECE_SIZE,
        first_masked=first,
    )


def delta_entry(key: Key, f: SnapshotFile, base: FileEntry, snapshot: Snapshot) -> FileEntry:
    """`base` with the pieces the worker read again replaced (and the count fitted to the new
    size). Raises BaseMismatch if `base` is not what the delta was asked from."""
    if base.kind != "sqlite" or base.piece_size not in (0, PIECE_SIZE):
        raise BaseMismatch(f"{f.path}: the stored entry is not a database cut in the same pieces")
    size = f.pages * f.page_size
    count = -(-size // PIECE_SIZE)
    ids = list(base.pieces[:count]) + [""] * max(0, count - len(base.pieces))
    first = base.first_masked
    for n in f.pieces:
        data = snapshot.piece(f.path, n)
        ids[n] = key.piece_id(data)
        if n == 0:
            first = masked_first(key, data)
    if "" in ids or (count and not first):
        raise BaseMismatch(f"{f.path}: the delta does not cover the pieces its size needs")
    return FileEntry(
        path=f.path,
        kind=f.kind,
        mode=f.owner.mode,
        size=size,
        sha256="",
        pieces=tuple(ids),
        uid=f.owner.uid,
        gid=f.owner.gid,
        content_sha=sqlite_content_sha(first, ids),
        checked=False,
        piece_size=PIECE_SIZE,
        first_masked=first,
    )


def read_pieces(
    snapshot: Snapshot, f: SnapshotFile, entry: FileEntry
) -> Iterator[tuple[str, bytes]]:
    """(id, content) of the pieces of `entry` the snapshot holds (all of a copied file, the
    re-read ones of a delta)."""
    if f.status == "delta":
        for n in f.pieces:
            yield entry.pieces[n], snapshot.piece(f.path, n)
        return
    content = memoryview(snapshot.content(f.path))
    for n, piece_id in enumerate(entry.pieces):
        yield piece_id, bytes(content[n * PIECE_SIZE : (n + 1) * PIECE_SIZE])
