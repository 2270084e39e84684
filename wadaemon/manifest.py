"""A generation's manifest: which files an account directory held and which pieces make them."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from wadaemon.errors import IntegrityError

FORMAT_VERSION = 1


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

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":"), sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes, account: str, generation: int) -> Manifest:
        try:
            raw: dict[str, Any] = json.loads(data)
            if raw.get("format") != FORMAT_VERSION:
                raise IntegrityError(
                    f"manifest format {raw.get('format')!r} is not supported by this version "
                    f"(it reads format {FORMAT_VERSION}); upgrade wadaemon"
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
        for path in [f.path for f in files] + [d.path for d in dirs if d.path != "."]:
            parts = path.split("/")
            if path.startswith("/") or ".." in parts or "" in parts or "." in parts:
                raise IntegrityError(f"manifest holds an unsafe path {path!r}")
        return manifest


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)
