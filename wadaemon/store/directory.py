"""The directory backend: a local (or mounted) directory, the embedded default.

<root>/<account>/HEAD.json                 the head, replaced atomically
<root>/<account>/generations/<gen>.bin     encrypted manifests, created once
<root>/<account>/pieces/<id[:2]>/<id>      encrypted pieces
<root>/<account>/account.json              the account's metadata record, replaced atomically
<root>/<account>/.commit.lock, .head.lock,
                 .account.lock             flock(2) locks shared by every process

The root itself is never created here: the package creates it (or the administrator, or the
quick start). A root that does not exist is a backup disk that is not mounted, an outage
(StoreUnavailable), never an empty store: an empty store would let the daemon start with
nothing to restore, and a backup would create a new store on the wrong disk.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
from collections.abc import Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

from wadaemon.fsutil import atomic_create, atomic_write
from wadaemon.layout import is_account_id
from wadaemon.store.base import (
    Head,
    NotFound,
    StoreError,
    StoreUnavailable,
    check_head_switch,
)

GEN_WIDTH = 12


class DirectoryStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._mkdir_lock = threading.Lock()
        self._swept: set[str] = set()  # accounts whose leftover temporary files were removed

    def describe(self) -> str:
        return f"directory {self.root}"

    def _check_root(self) -> None:
        """Raise StoreUnavailable if the root is not there (a backup disk not mounted)."""
        if not self.root.is_dir():
            raise StoreUnavailable(self.absent())

    def absent(self) -> str:
        if self.root.exists():
            return (
                f"the backup directory {self.root} is not a directory; is the backup disk mounted?"
            )
        return (
            f"the backup directory {self.root} does not exist; is the backup disk mounted? "
            "(on a new installation, create it, mode 0700, owned by the daemon's user)"
        )

    # --- paths ---
    def _account(self, account: str, create: bool = False) -> Path:
        path = self.root / account
        if create and not path.is_dir():
            with self._mkdir_lock:
                self._check_root()
                try:
                    path.mkdir(mode=0o700, exist_ok=True)
                    for sub in ("generations", "pieces"):
                        (path / sub).mkdir(mode=0o700, exist_ok=True)
                except OSError as exc:
                    raise StoreUnavailable(
                        f"cannot create {path}: {exc.strerror}; check that the backup directory "
                        "exists and is writable by the daemon's user"
                    ) from None
        return path

    def _piece_path(self, account: str, piece_id: str) -> Path:
        return self.root / account / "pieces" / piece_id[:2] / piece_id

    def _manifest_path(self, account: str, generation: int) -> Path:
        return self.root / account / "generations" / f"{generation:0{GEN_WIDTH}d}.bin"

    @contextmanager
    def _flock(self, account: str, name: str) -> Iterator[None]:
        path = self._account(account, create=True) / name
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    @contextmanager
    def _commit_lock(self, account: str) -> Iterator[None]:
        with self._flock(account, ".commit.lock"):
            if account not in self._swept:
                # once per process: a write of this process that fails removes its own
                # temporary file, so only a writer that died can have left one
                self._sweep_temporary(account)
                self._swept.add(account)
            yield

    def account_lock(self, account: str) -> AbstractContextManager[None]:
        return self._commit_lock(account)

    def _sweep_temporary(self, account: str) -> None:
        """Remove temporary files left by a writer that died (we hold the commit lock, and
        every write of an account happens under it)."""
        for dirpath, _dirs, files in os.walk(self.root / account):
            for name in files:
                if name.startswith(".") and name.endswith(".tmp"):
                    Path(dirpath, name).unlink(missing_ok=True)

    # --- accounts and heads ---
    def list_accounts(self) -> list[str]:
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            raise StoreUnavailable(self.absent()) from None
        except OSError as exc:
            raise StoreUnavailable(f"cannot list {self.root}: {exc.strerror}") from None
        return sorted(
            n for n in names if is_account_id(n) and (self.root / n / "HEAD.json").exists()
        )

    def read_head(self, account: str, *, for_switch: bool = False) -> Head | None:
        path = self.root / account / "HEAD.json"
        try:
            raw = json.loads(path.read_bytes())
        except FileNotFoundError:
            self._check_root()
            return None
        except (OSError, ValueError) as exc:
            raise StoreError(f"{path}: cannot read the head: {exc}") from None
        return Head.from_dict(raw)

    def head_location(self, account: str) -> str:
        return str(self.root / account / "HEAD.json")

    def switch_head(
        self, account: str, expected: int | None, head: Head, fence: int | None = None
    ) -> None:
        # no leases here: one daemon per sessions directory (its lock); `fence` is not used
        with self._flock(account, ".head.lock"):
            current = self.read_head(account)
            check_head_switch(account, current, expected, head)
            atomic_write(self.root / account / "HEAD.json", head.to_bytes())

    # --- pieces ---
    def missing_pieces(self, account: str, piece_ids: Iterable[str]) -> set[str]:
        missing = {p for p in set(piece_ids) if not self._piece_path(account, p).exists()}
        if missing:
            self._check_root()
        return missing

    def write_piece(self, account: str, piece_id: str, blob: bytes) -> None:
        path = self._piece_path(account, piece_id)
        self._account(account, create=True)
        try:
            path.parent.mkdir(mode=0o700, exist_ok=True)
            atomic_write(path, blob)
        except OSError as exc:
            raise StoreUnavailable(f"cannot write {path}: {exc.strerror}") from None

    def read_piece(self, account: str, piece_id: str) -> bytes:
        path = self._piece_path(account, piece_id)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            self._check_root()
            raise NotFound(f"piece {piece_id[:16]}… is missing from {self.describe()}") from None
        except OSError as exc:
            raise StoreUnavailable(f"cannot read {path}: {exc.strerror}") from None

    def read_pieces(self, account: str, piece_ids: Iterable[str]) -> dict[str, bytes]:
        """One file each: a local read has no round trip to save."""
        return {p: self.read_piece(account, p) for p in dict.fromkeys(piece_ids)}

    def list_pieces(self, account: str) -> set[str]:
        base = self.root / account / "pieces"
        found: set[str] = set()
        if not base.is_dir():
            self._check_root()
            return found
        for sub in os.scandir(base):
            if sub.is_dir():
                found.update(n for n in os.listdir(sub.path) if not n.startswith("."))
        return found

    def delete_piece(self, account: str, piece_id: str) -> None:
        self._piece_path(account, piece_id).unlink(missing_ok=True)

    # --- manifests ---
    def create_manifest(self, account: str, generation: int, blob: bytes) -> bool:
        self._account(account, create=True)
        try:
            return atomic_create(self._manifest_path(account, generation), blob)
        except OSError as exc:
            raise StoreUnavailable(
                f"cannot write a manifest for {account}: {exc.strerror}"
            ) from None

    def read_manifest(self, account: str, generation: int) -> bytes:
        path = self._manifest_path(account, generation)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            self._check_root()
            raise NotFound(f"{account}: generation {generation} has no manifest") from None
        except OSError as exc:
            raise StoreUnavailable(f"cannot read {path}: {exc.strerror}") from None

    def list_generations(self, account: str) -> list[int]:
        base = self.root / account / "generations"
        try:
            names = os.listdir(base)
        except FileNotFoundError:
            self._check_root()
            return []
        return sorted(int(n[:-4]) for n in names if n.endswith(".bin") and n[:-4].isdigit())

    def delete_manifest(self, account: str, generation: int) -> None:
        self._manifest_path(account, generation).unlink(missing_ok=True)

    # --- account metadata ---
    def record_account(self, account: str, fields: Mapping[str, object]) -> None:
        with self._flock(account, ".account.lock"):
            record = self.read_account(account) or {}
            record.update(fields)
            path = self.root / account / "account.json"
            try:
                data = json.dumps(record, sort_keys=True, indent=1).encode()
            except (TypeError, ValueError) as exc:
                raise StoreError(f"{account}: account fields are not JSON values: {exc}") from None
            try:
                atomic_write(path, data)
            except OSError as exc:
                raise StoreUnavailable(f"cannot write {path}: {exc.strerror}") from None

    def read_account(self, account: str) -> dict[str, Any] | None:
        path = self.root / account / "account.json"
        try:
            raw = json.loads(path.read_bytes())
        except FileNotFoundError:
            self._check_root()
            return None
        except (OSError, ValueError) as exc:
            raise StoreError(f"{path}: cannot read the account record: {exc}") from None
        if not isinstance(raw, dict):
            raise StoreError(f"{path}: the account record is not a JSON object")
        return raw

    def flush(self) -> None:
        """Nothing is held back: every write above is durable when it returns."""

    def close(self) -> None:
        """Nothing is held back or kept open."""
