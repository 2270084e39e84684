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
    kind: str  # "sqlite" | "file"
    mode: int
    size: int
    sha256: str
    pieces: tuple[str, ...]


@dataclass(frozen=True)
class Manifest:
    account: str
    generation: int
    created_at: str
    host: str
    digest: str
    files: tuple[FileEntry, ...]
    format: int = FORMAT_VERSION

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
                )
                for f in raw["files"]
            )
            manifest = cls(
                account=str(raw["account"]),
                generation=int(raw["generation"]),
                created_at=str(raw["created_at"]),
                host=str(raw["host"]),
                digest=str(raw["digest"]),
                files=files,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise IntegrityError(f"manifest is malformed: {exc!r}") from None
        if manifest.account != account or manifest.generation != generation:
            raise IntegrityError(
                f"manifest says account {manifest.account!r} generation {manifest.generation}, "
                f"expected {account!r} generation {generation}"
            )
        for f in files:
            parts = f.path.split("/")
            if f.path.startswith("/") or ".." in parts or "" in parts:
                raise IntegrityError(f"manifest holds an unsafe path {f.path!r}")
        return manifest
