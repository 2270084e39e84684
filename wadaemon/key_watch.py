"""The daemon's `keys` health check: the loaded keys must read every backup found at boot, and
every key file must still hold the key the daemon loaded from it.

Both failures used to stay silent until the next start: a backup sealed with a key that is not
loaded (a replaced key file, a forgotten `encryption.old_key_files`) cannot be restored, and a
key file deleted, made unreadable or overwritten while the daemon runs changes nothing at once
(the daemon seals with the key it holds in memory) but the next start cannot load it, or loads
another. Either makes the check `failing` (HTTP 503). It never gates the watchdog: a restart
would not bring a key back, and would lose the one in memory.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

from wadaemon.config import Config
from wadaemon.errors import ConfigError
from wadaemon.health import Check
from wadaemon.keyring import CREDENTIAL_NAME, Key, Keyring, parse_key
from wadaemon.lost_keys import SealedHead, with_unknown_keys
from wadaemon.private_file import read_private_file

log = logging.getLogger(__name__)

KEY_FILES_EVERY_S = 10.0  # a stat and a 65-byte read per key file
MAX_LISTED = 10
PUT_BACK = "put the file back from your copy before the next restart"


@dataclass(frozen=True)
class WatchedKeyFile:
    path: Path
    setting: str  # where it is configured, to start messages with
    key_id: str | None  # the key the daemon loaded from it; None: only watched for deletion


def watched_key_files(
    config: Config, keyring: Keyring, existed: Collection[Path] = ()
) -> list[WatchedKeyFile]:
    """The files the loaded keys came from (see load_keyring_for). When the systemd credential
    won, encryption.key_file is also watched, for deletion only, if it exists (or existed: is in
    `existed`): it is usually the credential's source (LoadCredential=), which systemd reads as
    root at the next start, and which the daemon's user may not read."""
    current = Path(keyring.current.source)
    key_file = config.encryption.key_file
    key_file_where = config.where("encryption", "key_file")
    if current == key_file:
        files = [WatchedKeyFile(current, key_file_where, keyring.current.key_id)]
    else:
        credential = f"systemd credential {CREDENTIAL_NAME}"
        files = [WatchedKeyFile(current, credential, keyring.current.key_id)]
        if key_file.exists() or key_file in existed:
            files.append(WatchedKeyFile(key_file, key_file_where, None))
    old_where = config.where("encryption", "old_key_files")
    files += [WatchedKeyFile(Path(k.source), old_where, k.key_id) for k in keyring.old]
    return files


def key_file_problem(f: WatchedKeyFile) -> str | None:
    """What happened to a key file since the daemon loaded it, or None if nothing did."""
    if f.key_id is None:
        if f.path.exists() or f.path.is_symlink():
            return None
        return (
            f"{f.setting}: the key file {f.path} was deleted; the daemon keeps using the "
            f"{CREDENTIAL_NAME} credential it was started with, but a unit whose LoadCredential= "
            f"names this file cannot start again: {PUT_BACK}"
        )
    memory = f"the daemon keeps using key {f.key_id} from memory"
    missing = f"it was deleted or moved while the daemon runs; {memory}: {PUT_BACK}"
    try:
        text = read_private_file(f.path, f.setting, "key file", missing)
    except ConfigError as exc:
        message = str(exc).rstrip(".")
        if message.endswith(missing):
            return message
        return f"{message}; {memory}, but the next start refuses the file as it is"
    try:
        found = Key.from_bytes(parse_key(text, str(f.path)), str(f.path)).key_id
    except ConfigError:
        return (
            f"{f.setting}: the key file {f.path} no longer holds a key (64 hexadecimal "
            f"characters); {memory}: {PUT_BACK}"
        )
    if found != f.key_id:
        return (
            f"{f.setting}: the key file {f.path} now holds key {found}, not key {f.key_id} that "
            f"the daemon loaded from it; {memory}, and the backups it sealed need it: {PUT_BACK}, "
            f"or, if the key was replaced on purpose, list a file holding key {f.key_id} under "
            "encryption.old_key_files and run `systemctl reload wadaemon`"
        )
    return None


def key_file_problems(files: Sequence[WatchedKeyFile]) -> dict[str, str]:
    """Each watched file's problem, by file (runs in a thread: it reads files)."""
    problems = {}
    for f in files:
        problem = key_file_problem(f)
        if problem is not None:
            problems[f"key file {f.path}"] = problem
    return problems


class KeyWatch:
    """What the `keys` check knows. Only the event loop calls it; it logs each problem once
    (error) when it appears or changes, and once (info) when it is gone."""

    def __init__(self, config: Config, keyring: Keyring) -> None:
        self.boot_heads: list[SealedHead] | None = None  # None: the store has not answered yet
        self.files: list[WatchedKeyFile] = []
        self.keyring = keyring
        self.old_key_files = ""
        self._reported: dict[str, str] = {}
        self._file_problems: dict[str, str] = {}
        self.reload(config, keyring)

    def reload(self, config: Config, keyring: Keyring) -> None:
        """Expect what a (re)loaded configuration and keyring hold; check the files next."""
        existed = [f.path for f in self.files if f.key_id is None]
        self.files = watched_key_files(config, keyring, existed)
        self.keyring = keyring
        self.old_key_files = config.where("encryption", "old_key_files")
        self._report()

    def heads_found(self, heads: Sequence[SealedHead]) -> None:
        self.boot_heads = list(heads)
        log.debug("keys: %d backups found at boot", len(heads))
        self._report()

    def files_checked(self, files: Sequence[WatchedKeyFile], problems: dict[str, str]) -> None:
        if files is not self.files:
            return  # a reload changed what is expected while the files were read
        self._file_problems = problems
        self._report()

    def problems(self) -> dict[str, str]:
        found: dict[str, str] = {}
        lost = with_unknown_keys(self.boot_heads or [], self.keyring)
        if lost:
            listed = ", ".join(f"{h.describe()} with key {h.key_id}" for h in lost[:MAX_LISTED])
            if len(lost) > MAX_LISTED:
                listed += f" and {len(lost) - MAX_LISTED} more"
            found["backups found at boot"] = (
                f"{self.old_key_files}: backups found at boot are sealed with keys that are not "
                f"loaded: {listed}; add the key files that sealed them to "
                "encryption.old_key_files, or put back the key file from your copy, then run "
                "`systemctl reload wadaemon`"
            )
        found.update(self._file_problems)
        return found

    def check(self) -> Check:
        problems = self.problems()
        if problems:
            return Check("failing", "; ".join(problems.values()))
        n = len(self.files)
        files = f"{n} key file{'s' if n != 1 else ''} unchanged"
        if self.boot_heads is None:
            return Check("ok", f"{files}; backups not checked yet (the store has not answered)")
        b = len(self.boot_heads)
        return Check(
            "ok",
            f"{files}; {b} backup{'s' if b != 1 else ''} found at boot, "
            "all readable with the loaded keys",
        )

    def _report(self) -> None:
        now = self.problems()
        for name, text in now.items():
            if self._reported.get(name) != text:
                log.error("keys: %s", text)
        for name in sorted(self._reported.keys() - now.keys()):
            log.info("keys: %s: ok again", name)
        self._reported = now
