"""Restore: bring an account directory back from its newest generation that verifies.

A generation is rebuilt in a temporary directory on the same filesystem as its destination,
checked (GCM tags, piece names, sizes and SHA-256 of every file, PRAGMA integrity_check of every
database in the worker process), fsynced, and only then renamed into place. A healthy local
session is never overwritten; a corrupt one is moved to `.quarantine/`, never deleted.

Only a bad generation (it fails authentication, hashes or integrity, or a piece of it is missing
or damaged in the store) makes a restore take the next older one. A problem on this machine (no
space, permissions, a read-only or failing disk) or a store that cannot be read stops the restore
instead: an older generation put in place would become the next backup's head, a silent rollback.
`failure_cause` is that decision, in one place.
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

from wadaemon.errors import DecryptError, IntegrityError, UnreadableSession, WadaemonError
from wadaemon.fsutil import fsync_dir, fsync_tree
from wadaemon.layout import SessionsLayout, has_files
from wadaemon.lineage import ADOPTED
from wadaemon.manifest import Manifest
from wadaemon.ownership import apply_owners
from wadaemon.replica import Replica, conflict_message
from wadaemon.snapshot import check_directory, take_snapshot
from wadaemon.store.base import NotFound, StoreDamaged, StoreError

log = logging.getLogger(__name__)


class RestoreFailed(WadaemonError):
    """No generation could be restored: each one tried is bad."""

    def __init__(self, message: str, failures: list[str]) -> None:
        super().__init__(message)
        self.failures = failures


class LocalRestoreError(WadaemonError):
    """The rebuilt copy could not be written on this machine (no space, no permission, a
    read-only or failing disk): not the backup's fault, so no older generation is taken."""


# What makes a generation bad, and only this: its data does not authenticate, does not match its
# hashes or is not whole, its manifest is malformed, or a piece of it is missing or damaged in
# the store.
BAD_GENERATION: tuple[type[Exception], ...] = (DecryptError, IntegrityError, NotFound, StoreDamaged)

# errno -> (what happened, the fix), for the message of a LocalRestoreError
_LOCAL_PROBLEMS = {
    errno.ENOSPC: ("no space left on device", "free space"),
    errno.EDQUOT: ("disk quota exceeded", "free space or raise the daemon's user's quota"),
    errno.EACCES: ("permission denied", "the daemon's user must own it and may write there"),
    errno.EPERM: ("operation not permitted", "the daemon's user must own it and may write there"),
    errno.EROFS: ("read-only file system", "mount it read-write"),
    errno.EIO: ("input/output error", "the disk is failing or gone; check the kernel log (dmesg)"),
}


def failure_cause(exc: BaseException) -> str:
    """Why a generation could not be rebuilt. "backup": the generation is bad, an older one may
    be taken. "store": the store could not be read; retry later. "local": a problem on this
    machine; fix it and retry. Neither of the last two may make an older generation current."""
    if isinstance(exc, (RestoreFailed, *BAD_GENERATION)):
        return "backup"
    if isinstance(exc, StoreError):
        return "store"
    return "local"


def local_problem(exc: OSError, where: Path) -> str:
    """What went wrong on this machine, where, and the fix."""
    what, fix = _LOCAL_PROBLEMS.get(
        exc.errno or 0, (exc.strerror or str(exc), "fix that on this machine")
    )
    return f"{what} under {where}: {fix}"


def local_error(exc: OSError, where: Path) -> LocalRestoreError:
    return LocalRestoreError(
        f"{local_problem(exc, where)}; no older generation is restored in its place, "
        "the newest is restored once this is fixed"
    )


@dataclass
class LocalState:
    state: str  # missing | empty | healthy | corrupt | unreadable | unknown | behind
    detail: str = ""


@dataclass
class RestoreOutcome:
    account: str
    # restored | kept | no-backup | inactive | failed | unchecked | unreadable | conflict
    status: str
    generation: int | None = None
    detail: str = ""
    failures: list[str] = field(default_factory=list)
    quarantined: Path | None = None
    head_state: str = ""  # for inactive: the head's state (logged_out, removed)
    backed_up: int | None = None  # the active head's generation, when the head was read
    cause: str = ""  # for failed: backup | store | local (see failure_cause)

    @property
    def ok(self) -> bool:
        return self.status not in ("failed", "unchecked", "unreadable", "conflict")

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
    their recorded modes and owners. A failure to write the copy is a LocalRestoreError."""
    manifest = replica.load_manifest(account, generation)
    try:
        dest.mkdir(mode=0o700)
        for entry in manifest.files:
            target = dest / entry.path
            target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            replica.write_file(account, entry, target)
        for d in manifest.dirs:
            (dest / d.path).mkdir(mode=0o700, parents=True, exist_ok=True)
        note = apply_owners(dest, manifest) if owners else ""
        fsync_tree(dest)
    except OSError as exc:
        raise local_error(exc, dest.parent) from exc
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
    cause: str = ""  # when not ok: backup (the generation is bad) | store | local
    # not ok because retention dropped the generation while it was drilled: not a failure
    dropped: bool = False
    damaged: tuple[str, ...] = ()  # pieces of the generation that fail authentication or id

    def as_dict(self) -> dict[str, object]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    def verdict(self) -> str:
        """What a failed drill means: FAILED only when the generation itself is bad."""
        if self.cause == "local":
            return f"NOT VERIFIED (a problem on this machine, not in the backup): {self.error}"
        if self.cause == "store":
            return f"NOT VERIFIED (the store cannot be read): {self.error}"
        return f"FAILED: {self.error}"


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
            cause = "store" if isinstance(exc, StoreError) else "backup"
            return DrillResult(account, generation, False, False, error=str(exc), cause=cause)
        if head is None:
            return DrillResult(
                account, None, False, False, error="no backup of this account", cause="backup"
            )
        g = head.generation if generation is None else generation
        is_head = g == head.generation
        try:
            with tempfile.TemporaryDirectory(prefix="wadaemon-verify-") as tmp:
                built = build_generation(replica, account, g, Path(tmp) / account, owners=False)
        except (WadaemonError, OSError) as exc:
            if isinstance(exc, OSError):  # the temporary directory itself
                exc = local_error(exc, Path(tempfile.gettempdir()))
            failure = exc
        else:
            m = built.manifest
            seconds = time.monotonic() - started
            return DrillResult(account, g, is_head, True, len(m.files), m.size, seconds)
        cause = failure_cause(failure)
        if cause != "backup":  # not the generation's fault: nothing to look for in it
            return DrillResult(account, g, is_head, False, error=str(failure), cause=cause)
        if not _dropped(replica, account, g):
            damaged = _damaged(replica, account, g)
            error = str(failure)
            if damaged:
                error += f" ({len(damaged)} damaged pieces in generation {g})"
            return DrillResult(
                account, g, is_head, False, error=error, damaged=damaged, cause="backup"
            )
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
        cause="store",
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
        Only a bad generation (failure_cause "backup") makes it try the next older one; any
        other error (LocalRestoreError, a store error) is raised at once, our partial copy
        removed.
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
            except BaseException as exc:
                shutil.rmtree(built, ignore_errors=True)  # our own partial copy
                if isinstance(exc, OSError):
                    raise local_error(exc, staging) from exc
                if not isinstance(exc, WadaemonError) or failure_cause(exc) != "backup":
                    raise
                failures.append(f"generation {g}: {exc}")
                log.warning("%s: generation %d cannot be restored: %s", account, g, exc)
                continue
            return g, result, built, failures
        tried = ", ".join(str(g) for g in candidates) or "none"
        raise RestoreFailed(
            f"{account}: no generation could be restored (tried {tried}): " + "; ".join(failures),
            failures,
        )

    def restore_account(
        self,
        account: str,
        *,
        force: bool = False,
        generation: int | None = None,
        takeover: bool = False,
    ) -> RestoreOutcome:
        """Restore into the sessions directory if the local session is missing, empty or corrupt
        (or always, with force). Never raises for an expected failure: the outcome says it.

        `takeover`: this instance has just acquired the account's lease, so the account was
        driven elsewhere and the head is the truth: a local copy is kept only if it provably
        descends from the head (its lineage names the head, or it holds changes made on top of
        it); any other copy, an adopted one included, is stale: it goes to .quarantine/ and the
        head is restored, where a single host would report a conflict."""
        target = self.layout.account_dir(account)
        local = inspect_local(target)
        if local.state == "healthy" and not force:
            reconciled = self._reconcile(account, local, takeover=takeover)
            if reconciled is not None and not (takeover and reconciled.status == "conflict"):
                return reconciled
            local = LocalState("behind", "unchanged since an older generation than the head")
            if reconciled is not None:
                local = LocalState("stale", "changed before another instance took it over")
        if local.state == "unknown" and not force:
            return RestoreOutcome(account, "unchecked", detail=local.detail + "; left as it is")
        if local.state == "unreadable":
            return RestoreOutcome(account, "unreadable", detail=local.detail + "; left as it is")
        try:
            head = self.replica.read_head(account)
        except WadaemonError as exc:
            return RestoreOutcome(
                account, "failed", detail=f"cannot read the backup head: {exc}", cause="store"
            )
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
            return RestoreOutcome(
                account, "failed", detail=str(exc), failures=exc.failures, cause="backup"
            )
        except WadaemonError as exc:
            cause = failure_cause(exc)
            where = {"store": "the store cannot be read: ", "local": "on this machine: "}
            return RestoreOutcome(
                account, "failed", detail=where.get(cause, "") + str(exc), cause=cause
            )
        quarantined: Path | None = None
        try:
            if target.exists() and local.state != "empty":
                reason = (
                    local.state if local.state in ("corrupt", "behind", "stale") else "replaced"
                )
                quarantined = self.layout.move_to_quarantine(account, reason)
            try:
                os.rename(built, target)  # replaces an empty directory atomically
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                quarantined = self.layout.move_to_quarantine(account, local.state)
                os.rename(built, target)
            fsync_dir(self.layout.root)
            # an older generation chosen by hand is committed on top of the head next: the
            # operator's rollback moves the backup forward, it does not rewind it
            self.layout.lineage.record(account, head.generation, target.stat().st_ino)
        except OSError as exc:
            shutil.rmtree(built, ignore_errors=True)
            return RestoreOutcome(
                account,
                "failed",
                g,
                "on this machine: cannot move the restored copy into place: "
                + local_problem(exc, self.layout.root),
                failures,
                quarantined,
                cause="local",
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

    def _reconcile(
        self, account: str, local: LocalState, *, takeover: bool = False
    ) -> RestoreOutcome | None:
        """A healthy local session is kept if it descends from the backup head (or equals it,
        or there is no active head). One that is an older generation unchanged (an old disk
        put back) returns None: the head is restored over it. One that diverged is a conflict:
        neither side is overwritten."""
        detail = f"local session is healthy ({local.detail})"
        descent = self.layout.lineage.read(account)
        try:
            head = self.replica.read_head(account)
        except WadaemonError as exc:
            if descent.generation is None:
                return RestoreOutcome(
                    account,
                    "unchecked",
                    detail=f"{detail}, but {descent.describe()} and the backup head cannot be "
                    f"read to compare ({exc}); checked again once the store answers",
                )
            return RestoreOutcome(account, "kept", detail=f"{detail}; backup unknown: {exc}")
        if head is None or head.state != "active":
            return RestoreOutcome(account, "kept", detail=f"{detail}; not backed up yet")
        parent = descent.parent_for(head.generation, head.digest)
        if parent == head.generation or (parent == ADOPTED and not takeover):
            return RestoreOutcome(account, "kept", detail=detail, backed_up=head.generation)
        # taking over, an adopted copy proves nothing: only equal content keeps it
        claimed = None if takeover and descent.generation == ADOPTED else descent.generation
        try:
            relation, head = self.replica.relation(
                take_snapshot(account, self.layout.account_dir(account)),
                claimed,
                descent.pending,
            )
        except WadaemonError as exc:
            return RestoreOutcome(
                account,
                "unchecked",
                detail=f"{detail}, but it cannot be compared with the backup head: {exc}",
            )
        if head is None or relation in ("new", "ahead"):
            return RestoreOutcome(account, "kept", detail=detail)
        if relation == "same":
            self.layout.lineage.record(account, head.generation, descent.inode)
            return RestoreOutcome(
                account,
                "kept",
                detail=f"{detail}; equal to the backup head",
                backed_up=head.generation,
            )
        if relation == "behind":
            return None
        return RestoreOutcome(
            account,
            "conflict",
            detail=conflict_message(account, head.generation, descent.generation, relation),
            backed_up=head.generation,
        )

    def restore_to(self, account: str, dest: Path, generation: int | None = None) -> RestoreOutcome:
        """Restore into `dest` (which must not exist, or be empty), outside the sessions path."""
        if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
            raise WadaemonError(f"{dest} exists and is not an empty directory; choose a new path")
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise local_error(exc, dest.parent) from exc
        g, result, built, failures = self.build_newest(account, dest.parent, generation)
        try:
            os.rename(built, dest)
            fsync_dir(dest.parent)
        except OSError as exc:
            shutil.rmtree(built, ignore_errors=True)
            raise local_error(exc, dest.parent) from exc
        manifest = result.manifest
        detail = f"{len(manifest.files)} files, {manifest.size} bytes into {dest}"
        if failures:
            detail += "; newer generations failed: " + "; ".join(failures)
        if result.owners_note:
            detail += "; " + result.owners_note
        return RestoreOutcome(account, "restored", g, detail, failures)
