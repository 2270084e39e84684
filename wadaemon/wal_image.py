"""A WAL-mode database as of its last commit, read from the database file and its `-wal`.

Used by the snapshot worker only (the daemon never opens a live session database). A database
in WAL mode says which pages changed: every commit appends the pages it wrote to the `-wal` as
frames, each with a checksum chained from the previous one and the WAL's salt (see SQLite's
"WAL file format"). So a capture reads only the frames appended since the last one, and a page
is read from its newest committed frame, else from the database file.

Why that image is consistent: the worker holds a read transaction while it reads. A checkpoint
copies frames into the database file only up to the oldest reader's position, so no page the
image takes from the database file changes under it; a WAL restart (new salt, frames written
again from the start) is seen in the header, read again after the pages (it is written before
any new frame), and the capture is then taken again. Frames after the last commit (a
transaction being written, whose frames SQLite may still rewrite in place) are never used, nor
remembered.

Positions: (salt-1, salt-2, frame, checksum-1, checksum-2) of a commit frame. Between two
positions of one WAL (same salt, the older one's checksum still the one in the chain) the pages
that changed are exactly those with a frame between them: a WAL is only appended to until it
restarts, and before a restart every frame is copied into the database file. Any other pair (a
restart in between, the database replaced) needs a full read.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field

WAL_HEADER = 32
FRAME_HEADER = 24
MAGIC = 0x377F0682  # | 1: checksums of big-endian words
Position = tuple[int, int, int, int, int]


class NotWal(Exception):
    """The WAL cannot be used (absent, malformed, another page size): read in full."""


def checksum(data: bytes, s0: int, s1: int, big: bool) -> tuple[int, int]:
    """SQLite's WAL checksum of `data` (a multiple of 8 bytes), continued from (s0, s1)."""
    words = struct.unpack(f"{'>' if big else '<'}{len(data) // 4}I", data)
    it = iter(words)
    for x0, x1 in zip(it, it, strict=True):
        s0 = (s0 + x0 + s1) & 0xFFFFFFFF
        s1 = (s1 + x1 + s0) & 0xFFFFFFFF
    return s0, s1


def _pread(fd: int, size: int, offset: int) -> bytes:
    out = b""
    while len(out) < size:
        chunk = os.pread(fd, size - len(out), offset + len(out))
        if not chunk:
            break
        out += chunk
    return out


@dataclass
class WalState:
    """What one database's WAL held at its last commit, as far as read."""

    ident: tuple[int, int]  # (st_dev, st_ino) of the database
    header: bytes  # the WAL header read
    page_size: int
    big: bool
    frame: int = 0  # the last commit frame read (0: none)
    cksum: tuple[int, int] = (0, 0)  # the chain's checksum at `frame`
    db_pages: int = 0  # the database's size in pages after that commit (0: the file's)
    newest: dict[int, int] = field(default_factory=dict)  # page -> its newest committed frame
    commits: dict[int, tuple[int, int]] = field(default_factory=dict)  # commit frame -> cksum

    @property
    def salt(self) -> tuple[int, int]:
        if not self.header:
            return 0, 0
        s1, s2 = struct.unpack(">II", self.header[16:24])
        return s1, s2

    def position(self) -> Position:
        return (*self.salt, self.frame, *self.cksum)

    def changed_since(self, since: Position | None) -> set[int] | None:
        """Pages written by the commits after `since`; None if `since` is not a position of
        this WAL (a full read is needed)."""
        if since is None or not self.header or tuple(since[:2]) != self.salt:
            return None  # no WAL: the file may have taken frames of a WAL since deleted
        frame, cksum = since[2], tuple(since[3:5])
        if frame == 0:
            known = cksum == struct.unpack(">II", self.header[24:32])
        else:
            known = self.commits.get(frame) == cksum
        if not known or frame > self.frame:
            return None
        return {page for page, f in self.newest.items() if f > frame}


def read_header(wal_fd: int) -> bytes | None:
    """The WAL header if it is whole and valid; None for an empty or new WAL."""
    header = _pread(wal_fd, WAL_HEADER, 0)
    if len(header) < WAL_HEADER:
        return None
    magic, version, page_size = struct.unpack(">III", header[:12])
    if magic & ~1 != MAGIC or version != 3007000:
        return None
    if checksum(header[:24], 0, 0, bool(magic & 1)) != struct.unpack(">II", header[24:32]):
        return None
    if page_size < 512 or page_size > 65536 or page_size & (page_size - 1):
        return None
    return header


def advance(
    state: WalState | None, ident: tuple[int, int], wal_fd: int | None, page_size: int
) -> WalState:
    """`state` brought up to the last commit in the WAL (a new state if the WAL restarted,
    or was replaced, or `state` is of another database)."""
    header = read_header(wal_fd) if wal_fd is not None else None
    if header is None:
        # no frames: the database file is the whole database
        return WalState(ident, b"", page_size, False)
    magic, _, wal_page_size = struct.unpack(">III", header[:12])
    if wal_page_size != page_size:
        raise NotWal(f"the WAL's page size {wal_page_size} is not the database's {page_size}")
    if state is None or state.ident != ident or state.header != header:
        state = WalState(ident, header, page_size, bool(magic & 1))
        state.cksum = struct.unpack(">II", header[24:32])
    assert wal_fd is not None
    frame_size = FRAME_HEADER + page_size
    salt = header[16:24]
    n = state.frame
    s0, s1 = state.cksum
    pending: dict[int, int] = {}
    while True:
        offset = WAL_HEADER + n * frame_size
        raw = _pread(wal_fd, frame_size, offset)
        if len(raw) < frame_size or raw[8:16] != salt:
            break
        c0, c1 = checksum(raw[:8] + raw[FRAME_HEADER:], s0, s1, state.big)
        if (c0, c1) != struct.unpack(">II", raw[16:24]):
            break
        s0, s1 = c0, c1
        n += 1
        page, commit_size = struct.unpack(">II", raw[:8])
        pending[page] = n
        if commit_size:
            state.newest.update(pending)
            pending.clear()
            state.frame, state.cksum, state.db_pages = n, (s0, s1), commit_size
            state.commits[n] = (s0, s1)
    return state


class PageReader:
    """Pages of the database as of `state`'s commit (the caller holds a read transaction)."""

    def __init__(self, state: WalState, db_fd: int, wal_fd: int | None) -> None:
        self.state = state
        self.db_fd = db_fd
        self.wal_fd = wal_fd
        size = os.fstat(db_fd).st_size
        self.pages = state.db_pages or size // state.page_size

    def page(self, number: int) -> bytes:
        s = self.state
        frame = s.newest.get(number)
        if frame is not None and self.wal_fd is not None:
            offset = WAL_HEADER + (frame - 1) * (FRAME_HEADER + s.page_size) + FRAME_HEADER
            data = _pread(self.wal_fd, s.page_size, offset)
        else:
            data = _pread(self.db_fd, s.page_size, (number - 1) * s.page_size)
        if len(data) != s.page_size:
            raise NotWal(f"page {number} is beyond the end of the database file")
        return data

    def span(self, first: int, count: int) -> bytes:
        """`count` pages from page `first` (1-based), as far as the database reaches."""
        last = min(self.pages, first + count - 1)
        if last < first:
            return b""
        s = self.state
        if not any(p in s.newest for p in range(first, last + 1)):
            data = _pread(self.db_fd, (last - first + 1) * s.page_size, (first - 1) * s.page_size)
            if len(data) != (last - first + 1) * s.page_size:
                raise NotWal(f"pages {first}-{last} are beyond the end of the database file")
            return data
        return b"".join(self.page(p) for p in range(first, last + 1))

    def rows_in(self, root: int) -> int:
        """Rows of the table whose b-tree starts at page `root` (raises NotWal if the pages are
        not a table b-tree)."""
        count = 0
        todo = [root]
        seen = 0
        while todo:
            number = todo.pop()
            seen += 1
            if seen > self.pages:
                raise NotWal("a loop in a b-tree")
            data = self.page(number)
            base = 100 if number == 1 else 0
            kind = data[base]
            cells = struct.unpack(">H", data[base + 3 : base + 5])[0]
            if kind == 0x0D:
                count += cells
            elif kind == 0x05:
                todo.append(struct.unpack(">I", data[base + 8 : base + 12])[0])
                for i in range(cells):
                    at = struct.unpack(">H", data[base + 12 + 2 * i : base + 14 + 2 * i])[0]
                    todo.append(struct.unpack(">I", data[at : at + 4])[0])
            else:
                raise NotWal(f"page {number} is not a table b-tree page")
        return count
