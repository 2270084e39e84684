"""A generation's manifest: which files an account directory held and which pieces make them."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from wadaemon.errors import IntegrityError

FORMAT_VERSION = 1
# format 2: files with no whole-file SHA-256 (sha256 ""), whose content is fixed by their pieces'
# ids alone (keyed hashes, each checked when the piece is read); written only by generations
# that hold such a file, so that older versions still read every other generation
PIECES_ONLY_FORMAT = 2
# format 3: databases with pieces patched by pages stored apart (PiecePatch)
PATCHED_FORMAT = 3
READABLE_FORMATS = (FORMAT_VERSION, PIECES_ONLY_FORMAT, PATCHED_FORMAT)


@dataclass(frozen=True)
class Layer:
    """Pages of one piece written by one commit, kept in a page set (FileEntry.pagesets)."""

    pageset: int  # index into the entry's pagesets
    first: int  # where its first page is in that page set, in pages
    pages: tuple[int, ...]  # page numbers within the piece (0-based), ascending


@dataclass(frozen=True)
class PiecePatch:
    """Piece `index` of a database as a stored piece with some of its pages replaced.

    A one-row change rewrites a few pages of one 64 KiB piece: each commit stores the pages it
    wrote, of every piece of the file, as one small page set, and the manifest says which pages
    of which page sets apply to the stored piece `pieces[index]`, in order (oldest first).
    `content_id` is the keyed hash of the piece as patched, checked when the file is rebuilt.
    Every page past the stored piece's end up to `length` is in a layer.
    """

    index: int
    content_id: str
    length: int  # bytes of the patched piece
    page_size: int
    layers: tuple[Layer, ...]

    def apply(self, stored: bytes, pagesets: Sequence[bytes]) -> bytes:
        out = bytearray(stored[: self.length])
        out.extend(bytes(self.length - len(out)))
        size = self.page_size
        for layer in self.layers:
            source = pagesets[layer.pageset]
            for k, page in enumerate(layer.pages):
                if (page + 1) * size > self.length:
                    continue  # cut off since: a later layer or the end stands for it
                at = (layer.first + k) * size
                if at + size > len(source):
                    raise ValueError(f"page set {layer.pageset} is shorter than its layers say")
                out[page * size : (page + 1) * size] = source[at : at + size]
        return bytes(out)

    def to_raw(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "content_id": self.content_id,
            "length": self.length,
            "page_size": self.page_size,
            "layers": [[x.pageset, x.first, list(x.pages)] for x in self.layers],
        }

    @classmethod
    def from_raw(cls, raw: dict[str, Any], pagesets: int) -> PiecePatch:
        patch = cls(
            index=int(raw["index"]),
            content_id=str(raw["content_id"]),
            length=int(raw["length"]),
            page_size=int(raw["page_size"]),
            layers=tuple(
                Layer(int(s), int(first), tuple(int(p) for p in pages))
                for s, first, pages in raw["layers"]
            ),
        )
        if patch.page_size <= 0 or patch.length <= 0 or patch.length % patch.page_size:
            raise ValueError(f"patch of piece {patch.index} has a bad size")
        for x in patch.layers:
            if (
                not 0 <= x.pageset < pagesets
                or x.first < 0
                or list(x.pages) != sorted(set(x.pages))
            ):
                raise ValueError(f"patch of piece {patch.index} has a bad layer")
            if x.pages and x.pages[0] < 0:
                raise ValueError(f"patch of piece {patch.index} has a bad page")
        return patch


@dataclass(frozen=True)
class FileEntry:
    path: str
    kind: str  # "sqlite", or a file_kinds name ("json", "file")
    mode: int
    size: int
    sha256: str
    pieces: tuple[str, ...]
    # numeric owner and group; None in generations made before they were recorded, or when
    # the daemon's user namespace does not map them (systemd's PrivateUsers=)
    uid: int | None = None
    gid: int | None = None
    # SHA-256 of the content with SQLite's volatile header fields masked (what decides whether
    # anything changed); "" in older generations, where sha256 stands for it except for SQLite
    content_sha: str = ""
    # whether the content passed PRAGMA integrity_check when it was captured (SQLite databases
    # captured by what changed are not checked: see docs/performance.md); True in older
    # generations, which checked every database
    checked: bool = True
    piece_size: int = 0  # bytes per piece but the last; 0 in older generations (64 KiB)
    # SQLite: the keyed hash of the first piece with its volatile header fields masked (part of
    # content_sha, kept so that a capture that did not read the first piece again can reuse it)
    first_masked: str = ""
    # SQLite: pieces stored as a stored piece plus pages (see PiecePatch), by ascending index,
    # and the stored page sets their layers take pages from
    patches: tuple[PiecePatch, ...] = ()
    pagesets: tuple[str, ...] = ()

    def stored_ids(self) -> set[str]:
        """Every stored object the file is rebuilt from."""
        return {*self.pieces, *self.pagesets}

    def patch_of(self) -> dict[int, PiecePatch]:
        return {p.index: p for p in self.patches}

    def content_ids(self) -> list[str]:
        """The keyed hash of each piece of the content (a patched piece's as patched)."""
        ids = list(self.pieces)
        for p in self.patches:
            ids[p.index] = p.content_id
        return ids

    def same_content_sha(self) -> str:
        return self.content_sha or ("" if self.kind == "sqlite" else self.sha256)


@dataclass(frozen=True)
class DirEntry:
    path: str  # "." for the account directory itself
    mode: int
    uid: int | None  # None: unknown to the daemon (an owner its user namespace does not map)
    gid: int | None


@dataclass(frozen=True)
class Manifest:
    account: str
    generation: int
    created_at: str
    host: str
    digest: str
    files: tuple[FileEntry, ...]
    format: int = FORMAT_VERSION
    dirs: tuple[DirEntry, ...] = ()  # empty in generations made before they were recorded
    # the generation this one descends from (the head it was committed on); None: the first of
    # its line (no head, or one that ended: logged out, removed), or made before it was recorded
    parent: int | None = None

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def checked(self) -> bool:
        """Every database in it passed integrity_check when it was captured."""
        return all(f.checked for f in self.files)

    def to_bytes(self) -> bytes:
        # by hand: dataclasses.asdict deep-copies every field (a few ms per generation)
        raw: dict[str, Any] = dict(vars(self))
        raw["files"] = [_file_raw(f) for f in self.files]
        raw["dirs"] = [vars(d) for d in self.dirs]
        if any(f.patches for f in self.files):
            raw["format"] = PATCHED_FORMAT
        elif any(not f.sha256 for f in self.files):
            raw["format"] = PIECES_ONLY_FORMAT
        return json.dumps(raw, separators=(",", ":"), sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes, account: str, generation: int) -> Manifest:
        try:
            raw: dict[str, Any] = json.loads(data)
            if raw.get("format") not in READABLE_FORMATS:
                raise IntegrityError(
                    f"manifest format {raw.get('format')!r} is not supported by this version "
                    f"(it reads formats {READABLE_FORMATS}); upgrade wadaemon"
                )
            files = tuple(
                FileEntry(
                    path=str(f["path"]),
                    kind=str(f["kind"]),
                    mode=int(f["mode"]),
                    size=int(f["size"]),
                    sha256=str(f["sha256"]),
                    pieces=tuple(str(p) for p in f["pieces"]),
                    uid=_opt_int(f.get("uid")),
                    gid=_opt_int(f.get("gid")),
                    content_sha=str(f.get("content_sha", "")),
                    checked=bool(f.get("checked", True)),
                    piece_size=int(f.get("piece_size", 0)),
                    first_masked=str(f.get("first_masked", "")),
                    patches=tuple(
                        PiecePatch.from_raw(p, len(f.get("pagesets", ())))
                        for p in f.get("patches", ())
                    ),
                    pagesets=tuple(str(p) for p in f.get("pagesets", ())),
                )
                for f in raw["files"]
            )
            dirs = tuple(
                DirEntry(str(d["path"]), int(d["mode"]), _opt_int(d["uid"]), _opt_int(d["gid"]))
                for d in raw.get("dirs", ())
            )
            manifest = cls(
                account=str(raw["account"]),
                generation=int(raw["generation"]),
                created_at=str(raw["created_at"]),
                host=str(raw["host"]),
                digest=str(raw["digest"]),
                files=files,
                dirs=dirs,
                parent=_opt_int(raw.get("parent")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise IntegrityError(f"manifest is malformed: {exc!r}") from None
        if manifest.account != account or manifest.generation != generation:
            raise IntegrityError(
                f"manifest says account {manifest.account!r} generation {manifest.generation}, "
                f"expected {account!r} generation {generation}"
            )
        for f in files:
            if any(not 0 <= p.index < len(f.pieces) for p in f.patches):
                raise IntegrityError(f"manifest patches a piece {f.path} does not have")
        for path in [f.path for f in files] + [d.path for d in dirs if d.path != "."]:
            parts = path.split("/")
            if path.startswith("/") or ".." in parts or "" in parts or "." in parts:
                raise IntegrityError(f"manifest holds an unsafe path {path!r}")
        return manifest


def _file_raw(f: FileEntry) -> dict[str, Any]:
    raw = dict(vars(f))
    if f.patches:
        raw["patches"] = [p.to_raw() for p in f.patches]
        raw["pagesets"] = list(f.pagesets)
    else:
        del raw["patches"], raw["pagesets"]
    return raw


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)
