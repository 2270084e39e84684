"""Restore: bring an account directory back from its newest generation that verifies.

A generation is rebuilt in a temporary directory on the same filesystem as its destination,
checked (GCM tags, piece names, sizes and SHA-256 of every file, PRAGMA integrity_check of every
database in the worker process), fsynced, and only then renamed into place. A healthy local
session is never overwritten; a corrupt one is moved to `.quarantine/`, never deleted.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from wadaemon.errors import IntegrityError, UnreadableSession, WadaemonError
from wadaemon.fsutil import fsync_dir, fsync_tree
from wadaemon.layout import SessionsLayout, has_files
from wadaemon.manifest import Manifest
from wadaemon.ownership import apply_owners
from wadaemon.replica import Replica
from wadaemon.snapshot import check_directory

log = logging.getLogger(__name__)


class RestoreFailed(WadaemonError):
    def __init__(self, message: str, failures: list[str]) -> None:
        super().__init__(message)
        self.failures = failures


@dataclass
class LocalState:
    state: str  # missing | empty | healthy | corrupt | unreadable | unknown
    detail: str = ""


@dataclass
class RestoreOutcome:
    account: str
    status: str  # restored | kept | no-backup | inactive | failed | unchecked | unreadable
    generation: int | None = None
    detail: str = ""
    failures: list[str] = field(default_factory=list)
    quarantined: Path | None = None
    head_state: str = ""  # for inactive: the head's state (logged_out, removed)
    backed_up: int | None = None  # the active head's generation, when the head was read

    @property
    def ok(self) -> bool:
        return self.status not in ("failed", "unchecked", "unreadable")

    def line(self) -> str:
        text = f"{self.account}: {self.status}"
        if self.generation is not None:
            text += f" (generation {self.generation})"
        if self.detail:
            text += f": {self.detail}"
        return text


def inspect_local(path: Path) -> LocalState:
    if not path.is_dir():
        return LocalState("missing")
    try:
        if not has_files(path):
            return LocalState("empty")
        report = check_directory(path)
    except UnreadableSession as exc:
        return LocalState("unreadable", str(exc))
    except WadaemonError as exc:
        return LocalState("unknown", f"could not check it: {exc}")
    if report.healthy:
        return LocalState("healthy", f"{report.files} files, {len(report.databases)} databases ok")
    return LocalState("corrupt", report.describe_corruption())


@dataclass(frozen=True)
class Built:
    manifest: Manifest
    owners_note: str = ""  # what apply_owners could not set


def build_generation(
    replica: Replica, account: str, generation: int, dest: Path, *, owners: bool = True
) -> Built:
    """Rebuild one generation into the new directory `dest` and verify it completely: every
    piece authenticated, every file's size and SHA-256, and every file whole by its kind's test
    (integrity_check for databases, whole JSON...). With `owners`, files and directories get
    their recorded modes and owners."""
    manifest = replica.load_manifest(account, generation)
    dest.mkdir(mode=0o700)
    for entry in manifest.files:
        target = dest / entry.path
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        replica.write_file(account, entry, target)
    for d in manifest.dirs:
        (dest / d.path).mkdir(mode=0o700, parents=True, exist_ok=True)
    note = apply_owners(dest, manifest) if owners else ""
    fsync_tree(dest)
    report = check_directory(dest, private_copy=True)
    if not report.healthy:
        raise IntegrityError(f"restored copy is not whole: {report.describe_corruption()}")
    return Built(manifest, note)


DRILL_TRIES = 10  # head drills that lose a race with retention start again on the new head


@dataclass(frozen=True)
class DrillResult:
    account: str
    generation: int | None
    is_head: bool
    ok: bool
    files: int = 0
    size: int = 0
    seconds: float = 0.0
    error: str = ""
    # not ok because retention dropped the generation while it was drilled: not a failure
    dropped: bool = False
    damaged: tuple[str, ...] = ()  # pieces of the generation that fail authentication or id

    def as_dict(self) -> dict[str, object]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def drill(replica: Replica, account: str, generation: int | None = None) -> DrillResult:
    """A restore drill: rebuild a generation (the head by default) in a temporary directory and
    check it completely. Touches nothing local.

    A generation that fails while retention drops it (a concurrent commit moved the head past
    it) has not failed: a drill of the head starts again on the new head; a drill of a given
    generation says `dropped`. A generation that fails while it is still kept is checked piece
    by piece: `damaged` lists the pieces that fail authentication or their id check (or are
    missing), which a backup can upload again.
    """
    started = time.monotonic()
    failure: BaseException | None = None
    g: int | None = generation
    for _ in range(DRILL_TRIES):
        try:
            head = replica.read_head(account)
        except (WadaemonError, OSError) as exc:
            return DrillResult(account, generation, False, False, error=str(exc))
        if head is None:
            return DrillResult(account, None, False, False, error="no backup of this account")
        g = head.generation if generation is None else generation
        is_head = g == head.generation
        with tempfile.TemporaryDirectory(prefix="wadaemon-verify-") as tmp:
            try:
                built = build_generation(replica, account, g, Path(tmp) / account, owners=False)
            except (WadaemonError, OSError) as exc:
                failure = exc
            else:
                m = built.manifest
                seconds = time.monotonic() - started
                return DrillResult(account, g, is_head, True, len(m.files), m.size, seconds)
        if not _dropped(replica, account, g):
            damaged = _damaged(replica, account, g)
            error = str(failure)
            if damaged:
                error += f" ({len(damaged)} damaged pieces in generation {g})"
            return DrillResult(account, g, is_head, False, error=error, damaged=damaged)
        if generation is not None:
            return DrillResult(
                account,
                g,
                False,
                False,
                error=f"generation {g} is no longer kept: retention dropped it while it was "
                "drilled",
                dropped=True,
            )
        log.debug("%s: generation %d was dropped while drilled; drilling the new head", account, g)
    return DrillResult(
        account,
        g,
        True,
        False,
        error=f"the head moved on {DRILL_TRIES} times while it was drilled; the last try: "
        f"{failure}",
    )


def _dropped(replica: Replica, account: str, generation: int) -> bool:
    """Whether a generation that just failed is no longer kept (the head moved past it)."""
    try:
        head = replica.read_head(account)
    except (WadaemonError, OSError):
        return False
    return head is not None and generation not in head.history


def _damaged(replica: Replica, account: str, generation: int) -> tuple[str, ...]:
    try:
        return tuple(replica.damaged_pieces(account, generation))
    except (WadaemonError, OSError):
        return ()  # the manifest cannot be read, or the store stopped answering


class Restorer:
    def __init__(self, layout: SessionsLayout, replica: Replica) -> None:
        self.layout = layout
        self.replica = replica

    def build(self, account: str, generation: int, dest: Path) -> Built:
        return build_generation(self.replica, account, generation, dest)

    def build_newest(
        self, account: str, staging: Path, generation: int | None = None
    ) -> tuple[int, Built, Path, list[str]]:
        """Build the newest generation that verifies (or exactly `generation`) under `staging`.

        Returns (generation, what was built, its directory, failures of newer generations).
        """
        head = self.replica.read_head(account)
        if head is None:
            raise RestoreFailed(f"{account}: the store holds no backup of this account", [])
        if generation is not None and generation not in head.history:
            kept = ", ".join(str(g) for g in head.history)
            raise RestoreFailed(
                f"{account}: generation {generation} is not a kept backup (kept: {kept})", []
            )
        candidates = [generation] if generation is not None else list(head.history)
        failures: list[str] = []
        for g in candidates:
            built = staging / f"restore-{account}-{g}-{os.getpid()}-{os.urandom(4).hex()}"
            try:
                result = self.build(account, g, built)
            except (WadaemonError, OSError) as exc:
                failures.append(f"generation {g}: {exc}")
                log.warning("%s: generation %d cannot be restored: %s", account, g, exc)
                shutil.rmtree(built, ignore_errors=True)  # our own partial copy
                continue
            return g, result, built, failures
        tried = ", ".join(str(g) for g in candidates) or "none"
        raise RestoreFailed(
            f"{account}: no generation could be restored (tried {tried}): " + "; ".join(failures),
            failures,
        )

    def restore_account(
        self, account: str, *, force: bool = False, generation: int | None = None
    ) -> RestoreOutcome:
        """Restore into the sessions directory if the local session is missing, empty or corrupt
        (or always, with force). Never raises for an expected failure: the outcome says it."""
        target = self.layout.account_dir(account)
        local = inspect_local(target)
        if local.state == "healthy" and not force:
            detail = f"local session is healthy ({local.detail})"
            try:
                head = self.replica.read_head(account)
            except WadaemonError as exc:
                return RestoreOutcome(account, "kept", detail=f"{detail}; backup unknown: {exc}")
            active = head is not None and head.state == "active"
            return RestoreOutcome(
                account,
                "kept",
                detail=detail if active else f"{detail}; not backed up yet",
                backed_up=head.generation if head is not None and active else None,
            )
        if local.state == "unknown" and not force:
            return RestoreOutcome(account, "unchecked", detail=local.detail + "; left as it is")
        if local.state == "unreadable":
            return RestoreOutcome(account, "unreadable", detail=local.detail + "; left as it is")
        try:
            head = self.replica.read_head(account)
        except WadaemonError as exc:
            return RestoreOutcome(account, "failed", detail=f"cannot read the backup head: {exc}")
        if head is None:
            return RestoreOutcome(account, "no-backup", detail=f"local session is {local.state}")
        if head.state != "active" and generation is None and not force:
            return RestoreOutcome(
                account,
                "inactive",
                detail=f"the backup is marked {head.state}; not restored",
                head_state=head.state,
            )
        try:
            g, result, built, failures = self.build_newest(account, self.layout.tmp, generation)
        except RestoreFailed as exc:
            return RestoreOutcome(account, "failed", detail=str(exc), failures=exc.failures)
        except WadaemonError as exc:
            return RestoreOutcome(account, "failed", detail=str(exc))
        quarantined: Path | None = None
        try:
            if target.exists() and local.state != "empty":
                reason = "corrupt" if local.state == "corrupt" else "replaced"
                quarantined = self.layout.move_to_quarantine(account, reason)
            try:
                os.rename(built, target)  # replaces an empty directory atomically
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                quarantined = self.layout.move_to_quarantine(account, local.state)
                os.rename(built, target)
            fsync_dir(self.layout.root)
        except OSError as exc:
            shutil.rmtree(built, ignore_errors=True)
            return RestoreOutcome(
                account,
                "failed",
                g,
                f"cannot move the restored copy into place: {exc}",
                failures,
                quarantined,
            )
        manifest = result.manifest
        detail = f"{len(manifest.files)} files, {manifest.size} bytes, local was {local.state}"
        if failures:
            detail += "; newer generations failed: " + "; ".join(failures)
        if result.owners_note:
            detail += "; " + result.owners_note
        if quarantined:
            detail += f"; previous copy moved to {quarantined}"
        return RestoreOutcome(account, "restored", g, detail, failures, quarantined, backed_up=g)

    def restore_to(self, account: str, dest: Path, generation: int | None = None) -> RestoreOutcome:
        """Restore into `dest` (which must not exist, or be empty), outside the sessions path."""
        if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
            raise WadaemonError(f"{dest} exists and is not an empty directory; choose a new path")
        dest.parent.mkdir(parents=True, exist_ok=True)
        g, result, built, failures = self.build_newest(account, dest.parent, generation)
        os.rename(built, dest)
        fsync_dir(dest.parent)
        manifest = result.manifest
        detail = f"{len(manifest.files)} files, {manifest.size} bytes into {dest}"
        if failures:
            detail += "; newer generations failed: " + "; ".join(failures)
        if result.owners_note:
            detail += "; " + result.owners_note
        return RestoreOutcome(account, "restored", g, detail, failures)
