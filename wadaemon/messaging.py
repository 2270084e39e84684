"""Messages in and out of the accounts this daemon drives: the parts, composed.

    WhatsApp event -> Inbox (journal, then the message store) -> readers: the event stream on the
                      control socket and the webhooks
    outbox entry   -> Outbox (socket, CLI, Firestore's outbox collection) -> the account's
                      client -> the sent message into the Inbox too (receipts then find it)

The backends follow the backup target: Firestore (threads/..., outbox/...) for `firestore`, the
embedded SQLite store in messages.path for `directory` and `none`. The journal and the webhook
queue are always local (messages.path): they exist for the moments the store or the receiver
cannot be reached.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wadaemon.config import Config
from wadaemon.errors import WadaemonError
from wadaemon.health import Check
from wadaemon.messages.backends import open_backends
from wadaemon.messages.convert import changes_of
from wadaemon.messages.events import event_of, outbox_event
from wadaemon.messages.inbox import Inbox
from wadaemon.messages.journal import Journal
from wadaemon.messages.media import MediaFolder
from wadaemon.messages.model import ME, Change, Message
from wadaemon.messages.outbox import Outbox
from wadaemon.messages.protected_store import ProtectedStore
from wadaemon.messages.store import InvalidEntry, MessageStore, OutboxEntry, OutboxStore
from wadaemon.whatsapp.client import SendFailed, Sent

if TYPE_CHECKING:
    from wadaemon.keyring import Keyring
    from wadaemon.messages.webhooks import Webhooks
    from wadaemon.store.base import Store
    from wadaemon.whatsapp.supervisor import Supervisor

log = logging.getLogger("wadaemon.messages")

DRAIN_S = 10.0
SENDS_FINISH_S = 20.0
PROTECT_EVERY_S = 2.0
PROTECT_MAX_S = 300.0
OPEN_RETRY_S = 30.0
STREAM_QUEUE = 10_000


class Messaging:
    def __init__(
        self,
        config: Config,
        store: Store | None,
        supervisor: Supervisor,
        process: str,
        *,
        keyring: Keyring | None,
        local_accounts: Callable[[], list[str]],
        leased: bool,
        counted: Callable[[str, str, int], None],
    ) -> None:
        self.config = config
        self._backend = (store, keyring, process)
        self.supervisor = supervisor
        self.leased = leased
        self.local_accounts = local_accounts
        self._count = counted
        cfg = config.messages
        self.journal = Journal(cfg.path)
        self.inbox = Inbox(
            self.journal,
            max_bytes=cfg.queue_max_mb * 2**20,
            readers=self._pass_on,
            counted=counted,
        )
        # opened by run(), once the daemon holds its sessions directory
        self.messages: MessageStore | None = None
        self.outbox_store: OutboxStore | None = None
        self.outbox: Outbox | None = None
        self.protected: ProtectedStore | None = None
        self.open_error = ""
        self._changed = asyncio.Event()  # the embedded store changed since its last backup
        self.webhooks: Webhooks | None = None
        if cfg.webhook.url:
            from wadaemon.messages.webhooks import QUEUE_FILE, WebhookQueue, Webhooks

            self.webhooks = Webhooks(
                cfg.webhook,
                WebhookQueue(cfg.path / QUEUE_FILE),
                on_dropped=lambda event_id: counted("", "webhook_dropped", 1),
            )
            self.webhooks.load_secret()
        self.media: MediaFolder | None = None
        if cfg.download_media:
            self.media = MediaFolder(cfg.path / "media", cfg.media_max_mb * 2**20)
        self._downloads: set[asyncio.Future[None]] = set()
        self._streams: set[asyncio.Queue[dict[str, Any]]] = set()
        self._stop = asyncio.Event()

    def _open(self) -> None:
        store, keyring, process = self._backend
        messages, outbox_store, protected = open_backends(self.config, store, keyring)
        self.messages, self.outbox_store, self.protected = messages, outbox_store, protected
        self.outbox = Outbox(
            outbox_store,
            self.config.messages,
            process,
            self,
            counted=lambda account, what: self._count(account, what, 1),
        )
        self.inbox.store = messages

    async def run(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self._open)
                break
            except (WadaemonError, OSError, sqlite3.Error) as exc:
                self.open_error = f"cannot open the message store: {exc}"
                log.error("messages: %s; trying again in %.0f s", self.open_error, OPEN_RETRY_S)
                await asyncio.sleep(OPEN_RETRY_S)
        self.open_error = ""
        assert self.messages is not None and self.outbox_store and self.outbox
        log.info(
            "messages: stored in %s; outbox in %s; journal %s%s",
            self.messages.describe(),
            self.outbox_store.describe(),
            self.journal.path,
            f"; webhook {self.config.messages.webhook.url}" if self.webhooks else "",
        )
        parts = [self.inbox.run(), self.outbox.run()]
        if self.webhooks is not None:
            parts.append(self._deliver(self.webhooks))
        if self.protected is not None:
            parts.append(self._protect(self.protected))
        await asyncio.gather(*parts)

    def _ready(self) -> tuple[MessageStore, Outbox]:
        if self.messages is None or self.outbox is None:
            raise WadaemonError("the message store is still opening; try again in a moment")
        return self.messages, self.outbox

    async def _protect(self, protected: ProtectedStore) -> None:
        """Back the embedded store up after it changed, at most every PROTECT_EVERY_S; after
        failures, less often (doubling up to PROTECT_MAX_S)."""
        failures = 0
        while not self._stop.is_set():
            await self._changed.wait()
            pause = PROTECT_EVERY_S * 2**failures if failures else PROTECT_EVERY_S
            await asyncio.sleep(max(min(pause, PROTECT_MAX_S), self.config.backup.debounce_seconds))
            self._changed.clear()
            failures = 0 if await self._backup_store(protected, failures) else failures + 1

    async def _backup_store(self, protected: ProtectedStore, failures: int = 0) -> bool:
        try:
            await asyncio.to_thread(protected.backup)
        except (WadaemonError, OSError) as exc:
            if not failures:  # said once, until a backup succeeds again
                log.warning(
                    "messages: the embedded store %s could not be backed up: %s; retrying",
                    protected.dir,
                    exc,
                )
            self._changed.set()
            return False
        if failures:
            log.info("messages: the embedded store is backed up again")
        return True

    async def _deliver(self, webhooks: Webhooks) -> None:
        """The webhook deliveries, started again if their queue's disk fails them."""
        while not self._stop.is_set():
            try:
                await webhooks.run(self._stop)
                return
            except Exception as exc:  # sqlite3 errors (a full disk): events stay queued
                log.error("webhooks: deliveries stopped (%s); starting again in 10 s", exc)
                await asyncio.sleep(10)

    async def stop_sending(self) -> None:
        """Before the clients stop: no new send starts, sends in flight finish."""
        if self.outbox is not None:
            await self.outbox.stop(SENDS_FINISH_S)

    async def close(self) -> None:
        """After the clients stopped: write what waits, back the embedded store up, close."""
        if self.messages is not None:
            await self.inbox.drain(DRAIN_S)
        self._stop.set()
        if self.protected is not None:
            await self._backup_store(self.protected)
        for part in (self.journal, self.messages, self.outbox_store):
            if part is not None:
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(part.close)

    # --- in -------------------------------------------------------------------------------------

    def message_event(self, account: str, event: Any) -> None:
        changes = changes_of(account, event)
        if self.media is not None:
            changes = [self.media.planned(c) for c in changes]
        if not changes:
            return
        self.inbox.add(changes)  # durable from here on
        if self.media is not None and type(event).__name__ == "Message":
            for change in changes:
                if isinstance(change, Message) and change.media and change.media.path:
                    task = asyncio.ensure_future(self._download(change, event.Message))
                    self._downloads.add(task)
                    task.add_done_callback(self._downloads.discard)

    async def _download(self, message: Message, content: Any) -> None:
        assert self.media is not None and message.media is not None
        path = Path(message.media.path)
        if path.exists():
            return
        runner = self.supervisor.runners.get(message.account)
        try:
            if runner is None:
                raise WadaemonError("its client stopped")
            data = await runner.download(content)
            saved = await asyncio.to_thread(self.media.save, path, data)
        except (WadaemonError, OSError) as exc:
            log.warning("%s: media of %s not downloaded: %s", message.account, message.id, exc)
            self._count(message.account, "media_failed", 1)
            return
        self._count(message.account, "media_saved" if saved else "media_skipped", 1)

    def _pass_on(self, changes: Sequence[Change]) -> None:
        self._changed.set()
        events = [event_of(c) for c in changes]
        self._publish(events)

    def _publish(self, events: list[dict[str, Any]]) -> None:
        for queue in list(self._streams):
            for event in events:
                with contextlib.suppress(asyncio.QueueFull):
                    queue.put_nowait(event)
        if self.webhooks is not None and events:
            try:
                self.webhooks.enqueue(events)
            except Exception as exc:  # the webhook queue's disk: say so, keep storing
                log.error("webhooks: cannot queue %d events: %s", len(events), exc)

    def subscribe(self) -> asyncio.Queue[dict[str, Any]]:
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(STREAM_QUEUE)
        self._streams.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[dict[str, Any]]) -> None:
        self._streams.discard(queue)

    # --- out (SenderHost) -----------------------------------------------------------------------

    def driven_accounts(self) -> set[str]:
        return set(self.supervisor.runners)

    def send_ready(self, account: str) -> str | None:
        runner = self.supervisor.runners.get(account)
        if runner is None:
            if self.leased or account in self.local_accounts():
                return "wait: not driven here"
            return (
                f"there is no account {account} here; pair it first with `wadaemon accounts add "
                f"{account}`"
            )
        state = runner.state
        if state == "connected":
            return None
        if state in ("needs_qr", "logged_out"):
            return (
                f"{account} is logged out of WhatsApp ({state}); pair it again with "
                f"`wadaemon accounts add {account}`"
            )
        return f"wait: {state}"

    async def send_text(self, account: str, to: str, text: str, reply_to: str) -> Sent:
        runner = self.supervisor.runners.get(account)
        if runner is None:
            raise SendFailed(f"{account} is not driven here", "transient")
        return await runner.send_text(to, text, reply_to)

    def sent(self, entry: OutboxEntry, sent: Sent) -> None:
        self.inbox.add(
            [
                Message(
                    account=entry.account,
                    chat=sent.chat,
                    sender=ME,
                    id=sent.id,
                    timestamp=sent.timestamp or time.time(),
                    kind="text",
                    from_me=True,
                    text=entry.text,
                    quoted_id=entry.reply_to,
                    status="sent",
                    source="outbox",
                )
            ]
        )

    def outbox_changed(self, entry: OutboxEntry) -> None:
        self._changed.set()
        self._publish([outbox_event(entry)])

    # --- seen from outside ----------------------------------------------------------------------

    def check(self) -> Check:
        if self.outbox is None:
            if self.open_error:
                return Check("failing", self.open_error + "; messages wait in the journal")
            return Check("degraded", "the message store is opening")
        status, detail = self.inbox.check()
        depth, oldest = self.outbox.stats()
        detail += f"; outbox: {depth} waiting"
        if oldest is not None:
            detail += f" (oldest {oldest:.0f} s)"
        if self.webhooks is not None:
            backlog = self.webhooks.backlog()
            detail += f"; webhook backlog {backlog}"
        return Check(status, detail)

    def gauges(self) -> dict[str, float]:
        depth, oldest = self.outbox.stats() if self.outbox is not None else (0, None)
        out = {
            "journal_entries": float(self.journal.depth()),
            "journal_bytes": float(self.journal.bytes),
            "outbox_waiting": float(depth),
            "outbox_oldest_seconds": oldest or 0.0,
        }
        if self.webhooks is not None:
            out["webhook_backlog"] = float(self.webhooks.backlog())
            out["webhook_oldest_seconds"] = self.webhooks.oldest_age() or 0.0
        return out

    # --- the control socket's requests ----------------------------------------------------------

    async def submit(self, account: str, body: dict[str, Any]) -> tuple[OutboxEntry, bool]:
        """POST /accounts/{id}/messages: {to, text, reply_to?, key?, resend?}."""
        unknown = set(body) - {"to", "text", "reply_to", "key", "resend"}
        if unknown:
            raise InvalidEntry(
                f"unknown field(s) {', '.join(sorted(unknown))}: give to, text, and optionally "
                "reply_to, key (the idempotency key) and resend"
            )
        for name in ("to", "text", "reply_to", "key"):
            if name in body and not isinstance(body[name], str):
                raise InvalidEntry(f"`{name}` must be a string")
        ready = self.send_ready(account)
        if ready is not None and not ready.startswith("wait"):
            raise InvalidEntry(ready)  # nothing queued: it could never be sent
        key = body.get("key") or f"{account}-{secrets.token_hex(8)}"
        entry = OutboxEntry(
            key=key,
            account=account,
            to=str(body.get("to", "")).strip(),
            text=str(body.get("text", "")),
            reply_to=str(body.get("reply_to", "")),
            resend=bool(body.get("resend", False)),
            source="api",
        )
        return await self._ready()[1].submit(entry)

    async def entry(self, key: str) -> OutboxEntry | None:
        return await self._ready()[1].get(key)

    async def read(
        self, account: str, chat: str | None, since: float, limit: int
    ) -> list[dict[str, Any]]:
        messages = self._ready()[0]
        stored = await asyncio.to_thread(messages.messages, account, chat, since, limit)
        return [m.to_json() for m in stored]

    async def threads(self, account: str) -> list[dict[str, Any]]:
        threads = await asyncio.to_thread(self._ready()[0].threads, account)
        return [{"id": t.id, **dataclasses.asdict(t)} for t in threads]
