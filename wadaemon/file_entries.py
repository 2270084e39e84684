"""A captured file as a manifest entry: its pieces, named by keyed hashes, and what decides
whether its content changed.

Files are cut into pieces of PIECE_SIZE bytes (a multiple of every SQLite page size, so pieces
are page-aligned and a change of a few pages rebuilds a few pieces). A file captured whole
(status "copied") is cut here; a database captured by what changed (status "delta",
wal_capture.py) keeps the pieces of its entry in the generation the capture was asked from and
replaces those the worker read again: by a patch (the few pages written since the piece was
stored, in small page sets, one per commit) while the pages are few, else by the whole piece
stored again. So a one-row change stores the pages it wrote, not the 64 KiB pieces holding them.

SQLite databases get no whole-file SHA-256 (hashing a whole database for a one-row change cost
more than the change): their content is fixed by their ordered piece ids, which are keyed
hashes checked as each piece is read back (Replica.read_piece). What decides whether a database
changed (content_sha) is a hash over its piece ids, the first one taken with the volatile
header fields masked (first_masked, kept in the entry: a delta that did not touch the first
piece reuses it).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator, Sequence

from wadaemon.errors import WadaemonError
from wadaemon.keyring import Key
from wadaemon.manifest import FileEntry, Layer, PiecePatch
from wadaemon.snapshot import Snapshot, SnapshotFile

# A multiple of every SQLite page size (512 B to 64 KiB), so pieces are page-aligned. Smaller
# pieces upload less per change (a one-row change touches 1-5 pages); larger ones mean fewer
# documents per full backup.
PIECE_SIZE = 64 * 1024
# SQLite header fields that differ between two copies of the same content (file change counter,
# schema cookie, version-valid-for): masked when deciding whether anything changed.
_SQLITE_VOLATILE = ((24, 28), (40, 44), (92, 96))
# A piece read again becomes a patch (see PiecePatch) while at most PATCH_MAX bytes of its pages
# changed since it was stored, over at most MAX_LAYERS commits (what a restore reads, and the
# manifest carries, for it); past either, it is stored whole again and its patch dropped.
PATCH_MAX = PIECE_SIZE // 2
MAX_LAYERS = 8
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


def delta_entry(
    key: Key, f: SnapshotFile, base: FileEntry, snapshot: Snapshot
) -> tuple[FileEntry, dict[str, bytes]]:
    """`base` with the pieces the worker read again replaced (and the count fitted to the new
    size), and the page set to store with it ({id: content}, or none). A piece of which few
    pages changed since it was stored, over few commits, becomes a patch of the stored piece
    (PiecePatch): the pages this commit wrote go into the page set; others are stored whole
    again. Raises BaseMismatch if `base` is not what the delta was asked from."""
    if base.kind != "sqlite" or base.piece_size not in (0, PIECE_SIZE):
        raise BaseMismatch(f"{f.path}: the stored entry is not a database cut in the same pieces")
    size = f.pages * f.page_size
    count = -(-size // PIECE_SIZE)
    stored = list(base.pieces[:count]) + [""] * max(0, count - len(base.pieces))
    patches = {n: p for n, p in base.patch_of().items() if n < count}
    first = base.first_masked
    dirty = _dirty_by_piece(f)
    new_set = len(base.pagesets)  # the index this commit's page set gets
    written: list[bytes] = []  # its pages
    for n in f.pieces:
        data = snapshot.piece(f.path, n)
        content_id = key.piece_id(data)
        if n == 0:
            first = masked_first(key, data)
        old = patches.pop(n, None)
        layers = _layers(n, content_id, data, stored[n], old, dirty, f.page_size)
        if layers is None:
            stored[n] = content_id  # stored whole (again)
            continue
        assert dirty is not None  # else no layers
        page = f.page_size
        pages = tuple(sorted(p for p in dirty.get(n, ()) if (p + 1) * page <= len(data)))
        if pages:
            layers.append(Layer(new_set, len(written), pages))
            written.extend(data[p * page : (p + 1) * page] for p in pages)
        patches[n] = PiecePatch(n, content_id, len(data), f.page_size, tuple(layers))
    if "" in stored or (count and not first):
        raise BaseMismatch(f"{f.path}: the delta does not cover the pieces its size needs")
    made: dict[str, bytes] = {}
    sets = list(base.pagesets)
    if written:
        content = b"".join(written)
        sets.append(key.piece_id(content))
        made[sets[-1]] = content
    kept, pagesets = _referenced(patches, sets)
    entry = FileEntry(
        path=f.path,
        kind=f.kind,
        mode=f.owner.mode,
        size=size,
        sha256="",
        pieces=tuple(stored),
        uid=f.owner.uid,
        gid=f.owner.gid,
        checked=False,
        piece_size=PIECE_SIZE,
        first_masked=first,
        patches=kept,
        pagesets=pagesets,
    )
    entry = dataclasses.replace(entry, content_sha=sqlite_content_sha(first, entry.content_ids()))
    return entry, {i: c for i, c in made.items() if i in pagesets}


def _dirty_by_piece(f: SnapshotFile) -> dict[int, set[int]] | None:
    """The pages written since the capture's base, as page numbers within each piece; None if
    the worker did not say (every piece read is then stored whole)."""
    if f.dirty is None or not f.page_size:
        return None
    per_piece = PIECE_SIZE // f.page_size
    out: dict[int, set[int]] = {}
    for page in f.dirty:  # 1-based
        out.setdefault((page - 1) // per_piece, set()).add((page - 1) % per_piece)
    return out


def _layers(
    n: int,
    content_id: str,
    data: bytes,
    stored_id: str,
    old: PiecePatch | None,
    dirty: dict[int, set[int]] | None,
    page_size: int,
) -> list[Layer] | None:
    """The layers of the patch of piece `n` (now `data`) that stay, before this commit's pages
    are laid over them; None to store the piece whole: a new piece, one equal to the stored one,
    or too many pages or commits since it was stored."""
    if dirty is None or not stored_id or content_id == stored_id or len(data) % page_size:
        return None
    if old is not None and old.page_size != page_size:
        return None
    now = {p for p in dirty.get(n, ()) if (p + 1) * page_size <= len(data)}
    # an older layer every page of which a later one (or the end) replaces is dropped
    later = set(now)
    kept: list[Layer] = []
    for layer in reversed(old.layers if old else ()):
        live = [p for p in layer.pages if p not in later and (p + 1) * page_size <= len(data)]
        if live:
            kept.append(layer)
        later.update(layer.pages)
    kept.reverse()
    pages = now.union(*(layer.pages for layer in kept))
    if len(pages) * page_size > PATCH_MAX or len(kept) + bool(now) > MAX_LAYERS:
        return None
    return kept


def _referenced(
    patches: dict[int, PiecePatch], pagesets: list[str]
) -> tuple[tuple[PiecePatch, ...], tuple[str, ...]]:
    """The patches in order, with only the page sets their layers use, numbered again."""
    used = sorted({x.pageset for p in patches.values() for x in p.layers})
    ordered = [patches[n] for n in sorted(patches)]
    if used == list(range(len(pagesets))):
        return tuple(ordered), tuple(pagesets)  # all used: the numbers stand
    number = {old: new for new, old in enumerate(used)}
    out = tuple(
        PiecePatch(
            p.index,
            p.content_id,
            p.length,
            p.page_size,
            tuple(Layer(number[x.pageset], x.first, x.pages) for x in p.layers),
        )
        for p in ordered
    )
    return out, tuple(pagesets[i] for i in used)


def read_pieces(
    snapshot: Snapshot, f: SnapshotFile, entry: FileEntry
) -> Iterator[tuple[str, bytes]]:
    """(id, content) of the pieces of `entry` to be stored that the snapshot holds (all of a
    copied file, the re-read ones of a delta that did not become patches)."""
    if f.status == "delta":
        patched = entry.patch_of()
        for n in f.pieces:
            if n not in patched:
                yield entry.pieces[n], snapshot.piece(f.path, n)
        return
    content = memoryview(snapshot.content(f.path))
    for n, piece_id in enumerate(entry.pieces):
        yield piece_id, bytes(content[n * PIECE_SIZE : (n + 1) * PIECE_SIZE])
