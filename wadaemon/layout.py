"""The sessions directory: one directory per account, plus the daemon's own dot-directories.

<sessions_path>/<account_id>/      an account's session (session.db for neonize accounts)
<sessions_path>/.tmp/              restores being built (same filesystem)
<sessions_path>/.quarantine/       sessions set aside (corrupt, replaced); never deleted
<sessions_path>/.lineage/          which generation each local session descends from (lineage.py)
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import time
from pathlib import Path

from wadaemon.errors import ConfigError, UnreadableSession, WadaemonError, unreadable_message
from wadaemon.lineage import Lineage

ACCOUNT_ID_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
TMP_DIR = ".tmp"
QUARANTINE_DIR = ".quarantine"
LOCK_FILE = ".daemon.lock"


class InvalidAccountId(WadaemonError):
    pass


def validate_account_id(account: str) -> str:
    if not ACCOUNT_ID_RE.match(account):
        raise InvalidAccountId(
            f"{account!r} is not a valid account id: use 1 to 64 characters from a-z, 0-9, "
            "'_' and '-', starting with a letter or digit (it is also a directory and a "
            "document name)."
        )
    return account


def is_account_id(name: str) -> bool:
    return bool(ACCOUNT_ID_RE.match(name))


class SessionsLayout:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.tmp = root / TMP_DIR
        self.quarantine = root / QUARANTINE_DIR
        self.lineage = Lineage(root)
        self.used_before = False  # a daemon held this directory before (see lock)

    def unusable(self, exc: OSError) -> ConfigError:
        """Why the daemon cannot use the sessions directory, and the fix (exit status 78: a
        restart cannot fix it, an administrator must)."""
        path = exc.filename or self.root
        if self.root.exists() and not self.root.is_dir():
            what = f"{self.root} is not a directory"
            fix = "move what is there away, or point sessions_path ($SESSIONS_PATH) at a directory"
        elif exc.errno in (errno.ENOTDIR, errno.EEXIST):
            what = f"{path} is not a directory"
            fix = "the daemon keeps its own directory there: move what is there away"
        elif exc.errno == errno.EROFS:
            what = f"{self.root} is on a read-only file system"
            fix = (
                "the daemon writes there (its lock, restores, .tmp/): mount it read-write, or "
                "point sessions_path ($SESSIONS_PATH) at a writable directory"
            )
        elif exc.errno in (errno.EACCES, errno.EPERM):
            what = f"{path}: {exc.strerror}"
            fix = "the daemon's user must own the sessions directory (chown it to that user)"
        else:
            what = f"{path}: {exc.strerror or exc}"
            fix = "check that the sessions directory exists and that the daemon's user owns it"
        return ConfigError(f"cannot use the sessions directory: {what}; {fix}")

    def lock(self) -> int:
        """Take the sessions directory for this process; refuse if another daemon has it.

        Returns the descriptor that holds the lock; it is released when the process exits.
        A directory the daemon cannot use (read-only, not a directory) is a ConfigError.
        """
        path = self.root / LOCK_FILE
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.used_before = path.exists()
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise self.unusable(exc) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise WadaemonError(
                f"{self.root} is in use by another wadaemon (pid {holder}); stop it first, or "
                "give this one another sessions_path"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        return fd

    def prepare(self) -> list[str]:
        """Create the directories the daemon needs (sessions 0700) and clear stale temp files.
        Returns the sessions adopted by the lineage's first start (see Lineage.start).

        Only the daemon's own `.tmp/` is cleared: it holds copies being built, never the only
        copy of a session.
        """
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.quarantine.mkdir(mode=0o700, exist_ok=True)
            if self.tmp.exists():
                shutil.rmtree(self.tmp)
            self.tmp.mkdir(mode=0o700)
            return self.lineage.start(self.local_accounts(), self.used_before)
        except OSError as exc:
            raise self.unusable(exc) from None

    def prepare_tmp(self) -> None:
        """Make sure `.tmp/` exists, without clearing it (a running daemon may be using it)."""
        try:
            self.tmp.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise self.unusable(exc) from None

    def account_dir(self, account: str) -> Path:
        return self.root / validate_account_id(account)

    def local_accounts(self) -> list[str]:
        """Account ids that have a directory here; other names are ignored."""
        try:
            entries = list(os.scandir(self.root))
        except FileNotFoundError:
            return []
        return sorted(
            e.name for e in entries if is_account_id(e.name) and e.is_dir(follow_symlinks=False)
        )

    def account_of(self, path: str | Path) -> str | None:
        """The account a changed path belongs to, or None for the daemon's own or foreign paths."""
        try:
            rel = Path(path).relative_to(self.root)
        except ValueError:
            return None
        if not rel.parts:
            return None
        first = rel.parts[0]
        return first if is_account_id(first) else None

    def new_temp_dir(self, purpose: str, account: str) -> Path:
        self.tmp.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self.tmp / f"{purpose}-{account}-{os.getpid()}-{os.urandom(4).hex()}"
        path.mkdir(mode=0o700)
        return path

    def quarantine_path(self, account: str, reason: str) -> Path:
        self.quarantine.mkdir(mode=0o700, parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        base = self.quarantine / f"{account}.{stamp}.{reason}"
        path, n = base, 1
        while path.exists():
            n += 1
            path = base.with_name(f"{base.name}.{n}")
        return path

    def move_to_quarantine(self, account: str, reason: str) -> Path:
        """Set an account directory aside (rename, same filesystem). Nothing is deleted."""
        dest = self.quarantine_path(account, reason)
        os.rename(self.account_dir(account), dest)
        return dest


def has_files(path: Path) -> bool:
    """True if the directory tree holds at least one file. Raises UnreadableSession if a
    directory in it cannot be listed: an unreadable session must never look empty."""

    def fail(exc: OSError) -> None:
        if not isinstance(exc, FileNotFoundError):
            raise UnreadableSession(unreadable_message(exc.filename or path, exc.strerror))

    return any(files for _dirpath, _dirs, files in os.walk(path, onerror=fail))
