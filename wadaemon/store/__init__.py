"""Backends that hold encrypted generations: one module per backend."""

from __future__ import annotations

from wadaemon.config import Config
from wadaemon.errors import ConfigError
from wadaemon.store.base import (
    Fenced,
    Head,
    HeadConflict,
    NotFound,
    Store,
    StoreDamaged,
    StoreError,
    StoreUnavailable,
)
from wadaemon.store.directory import DirectoryStore

__all__ = [
    "DirectoryStore",
    "Fenced",
    "Head",
    "HeadConflict",
    "NotFound",
    "Store",
    "StoreDamaged",
    "StoreError",
    "StoreUnavailable",
    "open_store",
]


def open_store(config: Config) -> Store | None:
    """The configured backend, or None for `backup.target: none`."""
    target = config.backup.target
    if target == "none":
        return None
    if target == "directory":
        return DirectoryStore(config.backup.directory)
    if target == "firestore":
        # imported here: the Google client library takes most of a second to import, and only
        # this target needs it
        from wadaemon.store.firestore import open_firestore

        return open_firestore(config)
    raise ConfigError(f"{config.path}: backup.target {target!r} is not available in this version")
