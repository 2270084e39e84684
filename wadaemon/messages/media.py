"""Media content of incoming messages, when messages.download_media is on.

Files go to <messages.path>/media/<account>/<name>, where name is a hash of the message's key
(a message's media is saved once, whatever its redeliveries), with the extension of its type.
The stored message names that path as soon as it is stored; the file appears once downloaded.
The directory never grows past messages.media_max_mb: a download that would pass the cap is
skipped (said once per cap reached, and counted), never made room for by deleting older files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import mimetypes
import os
import threading
from pathlib import Path

from wadaemon.messages.model import Change, Message

log = logging.getLogger("wadaemon.messages")


class MediaFolder:
    def __init__(self, root: Path, cap_bytes: int) -> None:
        self.root = root
        self.cap = cap_bytes
        self.used = (
            sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) if root.exists() else 0
        )
        self._full_said = False
        self._lock = threading.Lock()

    def planned(self, change: Change) -> Change:
        """The change with its media's path set (where the download will go)."""
        if not isinstance(change, Message) or change.media is None:
            return change
        digest = hashlib.sha256(repr(change.key).encode()).hexdigest()[:32]
        ext = mimetypes.guess_extension(change.media.mimetype.split(";")[0].strip()) or ""
        path = self.root / change.account / f"{digest}{ext}"
        return dataclasses.replace(change, media=dataclasses.replace(change.media, path=str(path)))

    def save(self, path: Path, data: bytes) -> bool:
        """Write the file (atomically, mode 0600) unless it exists or would pass the cap."""
        with self._lock:  # downloads save from several threads: the cap holds for their sum
            if path.exists():
                return True
            if self.used + len(data) > self.cap:
                self._full()
                return False
            self.used += len(data)
        try:
            self._write(path, data)
        except OSError:
            with self._lock:
                self.used -= len(data)
            raise
        return True

    def _full(self) -> None:
        if not self._full_said:
            log.warning(
                "media: %s holds %d MiB, messages.media_max_mb is %d: media is no longer "
                "downloaded until files are removed there or the cap is raised",
                self.root,
                self.used // 2**20,
                self.cap // 2**20,
            )
            self._full_said = True

    @staticmethod
    def _write(path: Path, data: bytes) -> None:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        tmp.rename(path)
