"""Kinds of session files, and the test that says whether a copy of one is whole.

A writer that rewrites a file in place (Baileys' multi-file auth state: `open(O_TRUNC)`, then
`write()` on a later event-loop turn) leaves it empty or half written for a moment, and two
reads in that moment agree. So a copy is accepted only when it passes its kind's own test: a
state its writer meant. The same test guards every generation at restore and in drills, so a
torn file committed by an older version is never restored either.

SQLite databases are their own kind (recognised by their header, copied with the backup API and
checked with `PRAGMA integrity_check` by the snapshot worker); every other file is classified by
its name here. A new kind joins by adding a `FileKind` to `KINDS`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

SQLITE = "sqlite"


def _json_torn(data: bytes) -> str | None:
    if not data:
        return "0 bytes, which is not JSON"
    try:
        json.loads(data)
    except UnicodeDecodeError as exc:
        return f"not UTF-8 text ({exc.reason} at byte {exc.start})"
    except ValueError as exc:
        return f"not whole JSON ({len(data)} bytes: {exc})"
    return None


@dataclass(frozen=True)
class FileKind:
    name: str
    suffixes: tuple[str, ...]
    # why the content is not whole (a torn or half-written copy); None if it is whole
    torn: Callable[[bytes], str | None]


KINDS = (FileKind("json", (".json",), _json_torn),)
OTHER = FileKind("file", (), lambda _data: None)


def by_name(name: str) -> FileKind:
    """The kind a manifest or snapshot names (unknown names are plain files)."""
    return next((k for k in KINDS if k.name == name), OTHER)


def kind_of(path: str) -> FileKind:
    """The kind of a file that is not a SQLite database, from its name."""
    name = path.rsplit("/", 1)[-1].lower()
    for kind in KINDS:
        if name.endswith(kind.suffixes):
            return kind
    return OTHER
