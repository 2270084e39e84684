"""A database image (the bytes of a whole SQLite file) to and from a connection, in the worker.

Python 3.11 and newer do it in memory (Connection.serialize and deserialize). Python 3.10 (Ubuntu
22.04) has neither: there the image goes through a private temporary file (mode 0600 in a 0700
directory under $TMPDIR, a private /tmp under the packaged unit), deleted at once. Either way the
copies come back to the daemon over the worker's pipe, and nothing is written under the sessions.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import tempfile
from collections.abc import Iterator

IN_MEMORY = hasattr(sqlite3.Connection, "serialize")


def image_of(conn: sqlite3.Connection) -> bytes:
    """The bytes of the database `conn` holds (a copy made in memory)."""
    if IN_MEMORY:
        return bytes(conn.serialize())  # type: ignore[attr-defined,unused-ignore]
    with tempfile.TemporaryDirectory(prefix="wadaemon-image-") as tmp:
        path = os.path.join(tmp, "image.db")
        out = sqlite3.connect(path)
        try:
            conn.backup(out)
        finally:
            out.close()
        with open(path, "rb") as fh:
            return fh.read()


@contextlib.contextmanager
def opened_image(image: bytes) -> Iterator[sqlite3.Connection]:
    """A connection to a database image (one not in WAL mode), closed afterwards."""
    if IN_MEMORY:
        conn = sqlite3.connect(":memory:")
        try:
            conn.deserialize(image)  # type: ignore[attr-defined,unused-ignore]
            yield conn
        finally:
            conn.close()
        return
    with tempfile.TemporaryDirectory(prefix="wadaemon-image-") as tmp:
        path = os.path.join(tmp, "image.db")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(image)
        conn = sqlite3.connect(path)
        try:
            yield conn
        finally:
            conn.close()
