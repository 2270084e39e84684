"""One account's WhatsApp client, from start to stop: its lifecycle and its reactions.

The main loop decides, each time the client stops, what comes next:

    session missing -> restore it from the backup first (never connect an empty session)
    not paired      -> needs_qr, until `wadaemon accounts add` starts a pairing
    banned          -> wait until the ban expires
    replaced        -> stay stopped (another client took the session: do not fight over it)
    connect failed  -> retry with exponential backoff and jitter, asking first whether WhatsApp
                       can be reached at all (each neonize connect costs a descriptor)

Events arrive as neonize objects through the client's sink. A LoggedOut never deletes anything:
the local session goes to `.quarantine/`, the last good backup may be tried once (the logout
may be spurious), and only then is the backup head marked `logged_out` and the account
`needs_qr`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

from wadaemon.config import WhatsAppConfig
from wadaemon.errors import WadaemonError
from wadaemon.state import AccountState, iso_time
from wadaemon.whatsapp.client import (
    ClientFactory,
    ConnectError,
    SendFailed,
    Sent,
    WhatsAppClient,
)
from wadaemon.whatsapp.pairing import Pairing
from wadaemon.whatsapp.reachability import reachable
from wadaemon.whatsapp.session_db import SESSION_DB, SessionInfo, phone_of, prepare_session

log = logging.getLogger("wadaemon.whatsapp")

RETRY_FIRST_S = 2.0
RETRY_MAX_S = 300.0
PROBE_RETRY_MAX_S = 30.0  # a probe costs nothing to repeat; a neonize connect costs a descriptor
DISCONNECTED_RESTART_S = 600.0  # whatsmeow reconnects by itself; past this, restart the client
RUNNING = ("connecting", "connected", "disconnected", "offline")
PARKED = ("needs_qr", "logged_out", "replaced", "stopped")
MESSAGE_EVENTS = ("Message", "Receipt", "HistorySync")


class RunnerHost(Protocol):
    """What the daemon does for a runner (backups, restores, records, the state)."""

    def account_state(self, account: str) -> AccountState: ...

    def account_dir(self, account: str) -> Path: ...

    def can_restore(self) -> bool: ...

    async def restore_missing(self, account: str) -> tuple[str, str]:
        """Restore the account if its local session is missing: (status, one line); status is
        restored | kept | no-backup | inactive | failed (failed: worth retrying)."""
        ...

    async def backup_at_once(self, account: str, why: str) -> dict[str, Any]: ...

    def hold_backups(self, account: str, held: bool) -> None: ...

    def quarantine(self, account: str, reason: str) -> Path | None: ...

    async def mark_head(self, account: str, state: str) -> None: ...

    def record(self, account: str, fields: dict[str, object]) -> None: ...

    def message_event(self, account: str, event: Any) -> None:
        """A Message, Receipt or HistorySync event: stored before anything else is done."""
        ...

    def stream_replaced(self, account: str) -> None:
        """Another client took the session (with leases: is it the instance that took the
        account's lease over, or a client outside the leases?)."""
        ...


def _name(event: Any) -> str:
    return str(type(event).__name__)


class AccountRunner:
    def __init__(
        self,
        account: str,
        host: RunnerHost,
        factory: ClientFactory,
        config: WhatsAppConfig,
        *,
        probe: Callable[[], Awaitable[str | None]] = reachable,
    ) -> None:
        self.account = account
        self.host = host
        self.config = config
        self.st = host.account_state(account)
        self._factory = factory
        self._probe = probe
        self._client: WhatsAppClient | None = None
        self.pairing: Pairing | None = None
        self._task: asyncio.Task[None] | None = None
        self._side: set[asyncio.Task[Any]] = set()
        self._wake = asyncio.Event()
        self._stopping = False
        self._ban_until: float | None = None  # wall clock
        self._logout_retry = "none"  # none | running | used
        self._handling_logout = False
        self._vanished = False
        self._failures = 0
        self._restart: str | None = None  # why the runner itself stopped the running client

    @property
    def state(self) -> str:
        return self.st.client

    @property
    def db_path(self) -> Path:
        return self.host.account_dir(self.account) / SESSION_DB

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._stopping = False
            self._task = asyncio.create_task(self._main(), name=f"whatsapp-{self.account}")

    def resume_replaced(self) -> bool:
        """Connect again after a replaced stream (the lease keeper's one more try)."""
        if self.state != "replaced":
            return False
        self._set("connecting", "started again after its stream was replaced")
        self._wake.set()
        return True

    async def stop(self) -> None:
        """Stop the client for good (daemon shutdown, account removal)."""
        self._stopping = True
        self._wake.set()
        if self.pairing is not None:
            self.pairing.finish("failed", error="the daemon is stopping; run the command again")
        if self._client is not None:
            await self._client.stop()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(self._task, 15.0)
        for task in list(self._side):
            task.cancel()
        self._set("stopped", "the daemon stopped the client")

    def _spawn(self, coro: Awaitable[Any], name: str) -> None:
        task = asyncio.ensure_future(coro)
        task.set_name(f"{name}-{self.account}")
        self._side.add(task)
        task.add_done_callback(self._side_done)

    def _side_done(self, task: asyncio.Task[Any]) -> None:
        self._side.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error(
                "%s: %s failed: %r",
                self.account,
                task.get_name(),
                task.exception(),
                exc_info=task.exception(),
            )

    def _set(self, state: str, detail: str = "", *, quiet: bool = False) -> None:
        st = self.st
        changed = st.client != state
        if changed:
            st.client_since = time.time()
        st.client, st.client_detail = state, detail
        if changed:
            if not quiet:
                log.info(
                    "%s: whatsapp %s%s",
                    self.account,
                    state.replace("_", " "),
                    f" ({detail})" if detail else "",
                )
            self.host.record(
                self.account,
                {"status": state, "statusDetail": detail, "statusAt": iso_time(st.client_since)},
            )

    async def _sleep(self, seconds: float) -> None:
        """Sleep, waking early for a command (pairing, stop). A wake that came while the runner
        was busy elsewhere ends the next sleep at once: a command is never slept through."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._wake.wait(), max(0.0, seconds))
        self._wake.clear()

    def _backoff(self, cap: float = RETRY_MAX_S) -> float:
        delay: float = min(cap, RETRY_FIRST_S * 2.0 ** max(0, self._failures - 1))
        return delay * random.uniform(0.5, 1.0)

    async def _main(self) -> None:
        while not self._stopping:
            if self.pairing is None and self.state in PARKED:
                await self._sleep(3600)
                continue
            if self.state == "temp_banned" and self._ban_until is not None:
                left = self._ban_until - time.time()
                if left > 0:
                    await self._sleep(left)
                    continue
                self._ban_until = None
                self._set("connecting", "the temporary ban has expired")
            info = await self._session()
            if info is None:
                continue
            if not info.paired and self.pairing is None:
                self._set("needs_qr", f"not paired: run `wadaemon accounts add {self.account}`")
                continue
            if info.paired and self.pairing is not None:
                self.pairing.finish(
                    "failed",
                    error="this account is already paired; remove it first with "
                    f"`wadaemon accounts remove {self.account}`",
                )
                self.pairing = None
            if info.phone:
                self.st.phone = info.phone
            if self._failures and self.pairing is None:
                why = await self._probe()
                if why is not None:
                    self._failures += 1
                    await self._wait_retry(why, cap=PROBE_RETRY_MAX_S)
                    continue
            await self._run_client()

    async def _session(self) -> SessionInfo | None:
        """The local session, restored first if it vanished; None to go round again."""
        directory = self.db_path.parent
        if not self.db_path.exists() and self.pairing is None:
            line = "no session"
            if self.host.can_restore():
                status, line = await self.host.restore_missing(self.account)
                if status == "failed":
                    self._failures += 1
                    await self._wait_retry(f"the session is missing and was not restored: {line}")
                    return None
            if not self.db_path.exists():
                self._set("needs_qr", f"{line}; run `wadaemon accounts add {self.account}`")
                return None
        self._vanished = False
        try:
            if self.pairing is not None:
                directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            return await asyncio.to_thread(
                prepare_session, self.db_path, create=self.pairing is not None
            )
        except (WadaemonError, OSError) as exc:
            self._failures += 1
            if self.pairing is not None:
                self._end_pairing(f"cannot prepare the session database: {exc}")
            await self._wait_retry(f"cannot open the session database: {exc}")
            return None

    async def _wait_retry(self, why: str, cap: float = RETRY_MAX_S) -> None:
        delay = self._backoff(cap)
        self.st.connect_failures = self._failures
        self.st.next_connect_at = time.time() + delay
        self._set("offline", why, quiet=True)
        log.warning("%s: %s; retrying in %.0f s", self.account, why, delay)
        await self._sleep(delay)
        self.st.next_connect_at = None

    async def _run_client(self) -> None:
        if self._client is None:
            self._client = self._factory(self.account, self.db_path, self._on_event)
        pairing = self.pairing
        if pairing is not None:
            self.host.hold_backups(self.account, True)  # nothing worth keeping until paired
            self._set("pairing", "phone code" if pairing.phone else "QR code")
            self._spawn(self._pairing_deadline(pairing), "pairing-deadline")
            pairing.update("connecting")  # the client starts: WhatsApp's first QR code is next
        elif self.state not in ("connecting",):
            self._set("connecting")
        try:
            await self._client.run()
        except Exception as exc:  # ConnectError, or anything else the library raises
            if not isinstance(exc, ConnectError):
                log.exception("%s: the WhatsApp client failed", self.account)
            self._failures += 1
            if pairing is not None:
                self._end_pairing(
                    f"cannot connect to WhatsApp: {exc}; check that this machine reaches "
                    "web.whatsapp.com:443 (DNS, firewall), then run the command again"
                )
                return
            await self._wait_retry(f"connect failed: {exc}")
            return
        finally:
            if pairing is not None and self.pairing is pairing and not pairing.paired:
                self._end_pairing("the client stopped before the pairing finished")
        reason, self._restart = self._restart, None
        if self._stopping or self.state in PARKED or self.state == "temp_banned":
            return
        if self._vanished:
            self._set("connecting", "the session vanished; restoring it first")
            return
        if reason == "restart":
            return
        self._failures += 1
        await self._wait_retry(reason or "the client stopped unexpectedly")

    # --- pairing -----------------------------------------------------------------------------

    def begin_pairing(self, phone: str | None) -> Pairing:
        if self.pairing is not None:
            raise WadaemonError(f"{self.account}: a pairing is already running for this account")
        if self.state not in ("", "needs_qr", "logged_out", "stopped", "offline"):
            raise WadaemonError(
                f"{self.account}: the account is {self.state.replace('_', ' ')}, not waiting "
                f"for a pairing; to pair it anew, remove it first (`wadaemon accounts remove "
                f"{self.account}`)"
            )
        pairing = Pairing(self.account, phone, self.config.pairing_timeout_seconds)
        pairing.on_cancel = lambda: self._spawn(self._cancel_pairing(pairing), "pairing-cancel")
        self.pairing = pairing
        self._failures = 0
        self._wake.set()
        self.start()
        return self.pairing

    def _end_pairing(self, error: str) -> None:
        pairing, self.pairing = self.pairing, None
        self.host.hold_backups(self.account, False)
        if pairing is not None and not pairing.finished:
            pairing.finish("failed", error=error)
            log.warning("%s: pairing failed: %s", self.account, error)
        if self.state in ("pairing", "offline"):
            self._set("needs_qr", error)

    async def _pairing_deadline(self, pairing: Pairing) -> None:
        await asyncio.sleep(max(0.0, pairing.deadline - time.monotonic()))
        if self.pairing is pairing and not pairing.paired:
            self._end_pairing(
                f"nobody scanned or entered the code within "
                f"{self.config.pairing_timeout_seconds:.0f} s (whatsapp.pairing_timeout_seconds);"
                " run the command again"
            )
            if self._client is not None:
                await self._client.stop()

    async def _cancel_pairing(self, pairing: Pairing) -> None:
        if self.pairing is pairing and not pairing.paired:
            self._end_pairing("cancelled: the command that asked for it went away")
            if self._client is not None:
                await self._client.stop()

    async def _request_code(self, pairing: Pairing) -> None:
        assert self._client is not None and pairing.phone
        try:
            code = await self._client.pair_phone(pairing.phone)
        except Exception as exc:  # neonize raises its own PairPhoneError and others
            self._end_pairing(f"WhatsApp refused a pairing code for {pairing.phone}: {exc}")
            await self._client.stop()
            return
        pairing.update("code", code=code, phone=pairing.phone)

    async def _paired(self, pairing: Pairing | None, phone: str) -> None:
        self.st.phone = phone or self.st.phone
        self.host.hold_backups(self.account, False)
        self.host.record(self.account, {"phone": self.st.phone})
        result = await self.host.backup_at_once(self.account, "paired")
        if pairing is not None:
            self.pairing = None
            pairing.finish(
                "paired",
                phone=self.st.phone,
                backup=result.get("result"),
                generation=result.get("generation"),
                error=result.get("error"),
            )

    # --- events (from the client, on the event loop) -----------------------------------------

    def _on_event(self, event: Any) -> None:
        name = _name(event)
        st = self.st
        now = time.time()
        st.last_event, st.last_event_at = name, now
        if name in MESSAGE_EVENTS:
            try:
                self.host.message_event(self.account, event)
            except Exception:  # raised into the library's callback, it would vanish unseen
                log.exception("%s: storing %s failed", self.account, name)
        handler = getattr(self, f"_ev_{name}", None)
        if handler is None:
            log.debug("%s: event %s", self.account, name)
            return
        if name != "Message":
            log.debug("%s: event %s %s", self.account, name, str(event).replace("\n", " "))
        try:
            handler(event)
        except Exception:  # raised into the library's callback, it would vanish unseen
            log.exception("%s: handling %s failed", self.account, name)
        self.host.record(self.account, {"lastEventAt": iso_time(now)})

    def _ev_QR(self, event: Any) -> None:
        pairing = self.pairing
        if pairing is None:
            # a session that lost its device asks for a QR code: nobody is there to scan it
            self._set("needs_qr", "the session is not paired any more")
            if self._client is not None:
                self._spawn(self._client.stop(), "stop")
            return
        for code in event.Codes:
            pairing.update("qr", code=code)
        if pairing.phone and not pairing.code_requested:
            pairing.code_requested = True  # neonize takes PairPhone only after the first QR
            self._spawn(self._request_code(pairing), "pair-phone")

    def _ev_PairStatus(self, event: Any) -> None:
        pairing = self.pairing
        if event.Status == 2:  # SUCCESS
            jid = f"{event.ID.User}@{event.ID.Server}" if event.ID.User else ""
            phone = phone_of(jid) if jid else ""
            log.info("%s: paired with %s; backing up at once", self.account, phone or "a phone")
            if pairing is not None:
                pairing.paired = True  # from now on neither the deadline nor a cancel ends it
                pairing.update("linked", phone=phone)  # the backup that ends it comes next
            self._set("connecting", "paired; connecting")
            self._spawn(self._paired(pairing, phone), "paired-backup")
        else:
            self._end_pairing(f"WhatsApp reported a pairing error: {event.Error or 'unknown'}")
            if self._client is not None:
                self._spawn(self._client.stop(), "stop")

    def _ev_Connected(self, event: Any) -> None:
        self._failures = 0
        self.st.connect_failures = 0
        if self._logout_retry == "running":
            log.warning(
                "%s: connected with the restored backup: the logout was spurious and the "
                "session is recovered",
                self.account,
            )
            self._logout_retry = "none"
        self._set("connected")
        self.host.record(self.account, {"lastConnectedAt": iso_time(time.time())})
        self._spawn(self.host.backup_at_once(self.account, "connected"), "connected-backup")

    def _ev_Disconnected(self, event: Any) -> None:
        if self.state == "connected":
            self._set("disconnected", "connection lost; whatsmeow reconnects by itself")

    def _ev_KeepAliveTimeout(self, event: Any) -> None:
        if self.state in ("connected", "disconnected"):
            self._set("disconnected", f"keep-alive timeout ({event.ErrorCount} errors)")

    def _ev_KeepAliveRestored(self, event: Any) -> None:
        if self.state == "disconnected":
            self._set("connected", "keep-alive restored")

    def _ev_Message(self, event: Any) -> None:
        self.st.last_message_at = time.time()
        self.host.record(self.account, {"lastMessageAt": iso_time(self.st.last_message_at)})

    async def send_text(self, to: str, text: str, reply_to: str = "") -> Sent:
        """Send through this account's client (the outbox calls this); raises SendFailed."""
        client = self._client
        if self.state in ("needs_qr", "logged_out"):
            raise SendFailed(f"{self.account} is logged out of WhatsApp", "permanent")
        if client is None or self.state != "connected":
            raise SendFailed(f"{self.account} is not connected ({self.state})", "transient")
        return await client.send_text(to, text, reply_to)

    async def download(self, message: Any) -> bytes:
        client = self._client
        if client is None or self.state != "connected":
            raise WadaemonError(f"{self.account} is not connected ({self.state})")
        return await client.download(message)

    def _ev_StreamReplaced(self, event: Any) -> None:
        log.error(
            "%s: another client took over this session (stream replaced); not reconnecting, so "
            "the two do not fight over it. If this daemon holds the account's lease, the other "
            "client runs outside the leases (another program, or a wadaemon instance with "
            "another Firestore project or collection prefix): stop it, then `systemctl restart "
            "wadaemon`",
            self.account,
        )
        self._set("replaced", "another client took over the session")
        if self._client is not None:
            self._spawn(self._client.stop(), "stop")
        self.host.stream_replaced(self.account)

    def _ev_TemporaryBan(self, event: Any) -> None:
        expire = max(1, int(event.Expire))
        self._ban_until = time.time() + expire
        self.st.next_connect_at = self._ban_until
        self._set("temp_banned", f"code {int(event.Code)}, expires in {expire} s")
        if self._client is not None:
            self._spawn(self._client.stop(), "stop")

    def _ev_ConnectFailure(self, event: Any) -> None:
        detail = f"connect failure: reason {int(event.Reason)} {event.Message}".strip()
        if self.pairing is not None:
            self._end_pairing(detail)
        if self.state not in ("logged_out", "temp_banned", "replaced"):
            self._restart = detail
            if self._client is not None:
                self._spawn(self._client.stop(), "stop")

    def _ev_ClientOutdated(self, event: Any) -> None:
        log.error(
            "%s: WhatsApp says this client version is outdated; update the wadaemon package",
            self.account,
        )
        # the library does not reconnect after this: retry with backoff (up to every 5 min)
        self._restart = "WhatsApp refused this client version as outdated"
        if self._client is not None:
            self._spawn(self._client.stop(), "stop")

    def _ev_StreamError(self, event: Any) -> None:
        log.warning("%s: stream error %s", self.account, event.Code)

    def _ev_LoggedOut(self, event: Any) -> None:
        if self._handling_logout:
            return
        self._handling_logout = True
        # whatsmeow deletes the device from the database right after this event: that state must
        # never become a backup
        self.host.hold_backups(self.account, True)
        self._set("logged_out", f"reason {int(event.Reason)}, on connect: {bool(event.OnConnect)}")
        self._spawn(self._logged_out(), "logged-out")

    async def _logged_out(self) -> None:
        try:
            if self._client is not None:
                await self._client.stop()
            place = await asyncio.to_thread(self.host.quarantine, self.account, "logged-out")
            if place is not None:
                log.warning("%s: logged out; local session moved to %s", self.account, place)
            if (
                self.config.retry_after_logout
                and self._logout_retry == "none"
                and self.host.can_restore()
            ):
                self._logout_retry = "running"
                status, line = await self.host.restore_missing(self.account)
                if status == "restored":
                    log.warning(
                        "%s: trying the last good backup once, in case the logout was spurious: %s",
                        self.account,
                        line,
                    )
                    self._set("connecting", "retrying once with the last good backup")
                    self._wake.set()
                    return
            # confirmed (or no backup to try): keep every generation, but mark the head so that
            # no instance restores a dead session
            self._logout_retry = "none"
            await self.host.mark_head(self.account, "logged_out")
            self._set(
                "needs_qr",
                f"logged out; pair it again with `wadaemon accounts add {self.account}`",
            )
        finally:
            self.host.hold_backups(self.account, False)
            self._handling_logout = False

    # --- checks --------------------------------------------------------------------------------

    def session_gone(self) -> bool:
        return not self.db_path.exists()

    async def check(self) -> None:
        """The periodic health check: the session is on disk, and the client is connected."""
        if self.state in RUNNING and self.pairing is None and self.session_gone():
            self.vanished()
            return
        if self._client is None:
            return
        if self.state == "connected" and not await self._client.is_connected():
            self._set("disconnected", "health check: the client is not connected")
        elif self.state == "disconnected" and self.st.client_since is not None:
            down = time.time() - self.st.client_since
            if down > DISCONNECTED_RESTART_S:
                log.warning(
                    "%s: disconnected for %.0f s; restarting the client", self.account, down
                )
                self._set("connecting", f"restarted after {down:.0f} s disconnected")
                self._restart = "restart"
                await self._client.stop()

    def vanished(self) -> None:
        """The session directory disappeared while the client ran: restore, then reconnect."""
        if self._vanished or self._handling_logout or self.state not in RUNNING:
            return
        self._vanished = True
        log.error(
            "%s: the session vanished from disk while the client ran; stopping the client, "
            "restoring the session from the backup, then reconnecting",
            self.account,
        )
        if self._client is not None:
            self._spawn(self._client.stop(), "stop")
        self._wake.set()

    # --- removal ---------------------------------------------------------------------------------

    async def logout_for_removal(self) -> str:
        """Unlink the device on the server if the client is connected; a line saying what."""
        if self._client is None or self.state != "connected":
            return "not connected, so the phone still lists this device: unlink it there"
        try:
            await self._client.logout()
        except Exception as exc:  # neonize raises LogoutError and others
            return f"logout failed ({exc}); unlink the device on the phone"
        return "logged out on WhatsApp's servers"
