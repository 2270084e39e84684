"""The control socket's message endpoints (see control_socket for the others):

    POST /accounts/{id}/messages   queues a message to send: JSON {"to", "text", "reply_to"?,
                                   "key"? (idempotency key), "resend"?}; 201 with the new outbox
                                   entry, 200 with the existing one for a key seen before;
                                   ?wait=SECONDS answers once it is sent, failed or unknown
    GET  /outbox/{key}             one outbox entry
    GET  /accounts/{id}/messages   stored messages, oldest first: ?chat=JID&since=EPOCH&limit=N
    GET  /accounts/{id}/threads    the account's conversations, newest first
    GET  /events                   JSON lines of new events as they are stored (messages,
                                   receipts, reads, outbox states); ?account=ID
All of them answer only privileged peers (root, the daemon's user and group).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable

from aiohttp import web

from wadaemon.control_socket import ApiError, ControlApi, Handler, _json, _number
from wadaemon.errors import WadaemonError
from wadaemon.messages.store import FINAL_STATES, InvalidEntry
from wadaemon.messaging import Messaging

MAX_WAIT_S = 300.0
WAIT_POLL_S = 0.2
MAX_LIMIT = 1000
STREAM_KEEPALIVE_S = 15.0


class MessageRoutes:
    def __init__(self, api: ControlApi, account: Callable[[web.Request], str]) -> None:
        self.api = api
        self.account = account

    def add_to(self, router: web.UrlDispatcher, guard: Callable[[Handler], Handler]) -> None:
        router.add_post("/accounts/{account}/messages", guard(self._send))
        router.add_get("/accounts/{account}/messages", guard(self._messages))
        router.add_get("/accounts/{account}/threads", guard(self._threads))
        router.add_get("/outbox/{key}", guard(self._outbox))
        router.add_get("/events", guard(self._events))

    def _messaging(self) -> Messaging:
        messaging = self.api.messaging
        if messaging is None:
            raise ApiError(
                409,
                "messages are off here: they need the WhatsApp clients (whatsapp.enabled: true) "
                "and messages.enabled: true",
            )
        return messaging

    async def _send(self, request: web.Request) -> web.Response:
        account = self.account(request)
        messaging = self._messaging()
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            raise ApiError(
                400, 'the body must be JSON: {"to": NUMBER_OR_JID, "text": TEXT}'
            ) from None
        if not isinstance(body, dict):
            raise ApiError(400, 'the body must be a JSON object: {"to": ..., "text": ...}')
        wait = _number(request.query.get("wait", "0"), "wait")
        try:
            entry, created = await messaging.submit(account, body)
        except InvalidEntry as exc:
            raise ApiError(400, str(exc)) from None
        except WadaemonError as exc:
            raise ApiError(503, str(exc)) from None
        deadline = time.monotonic() + min(wait, MAX_WAIT_S)
        while entry.state not in FINAL_STATES and time.monotonic() < deadline:
            await asyncio.sleep(WAIT_POLL_S)
            entry = await messaging.entry(entry.key) or entry
        return _json(201 if created else 200, {"created": created, **entry.to_json()})

    async def _outbox(self, request: web.Request) -> web.Response:
        entry = await self._messaging().entry(request.match_info["key"])
        if entry is None:
            raise ApiError(404, f"no outbox entry {request.match_info['key']!r}")
        return _json(200, entry.to_json())

    async def _messages(self, request: web.Request) -> web.Response:
        account = self.account(request)
        q = request.query
        since = _number(q.get("since", "0"), "since")
        limit = int(_number(q.get("limit", "100"), "limit"))
        if not 1 <= limit <= MAX_LIMIT:
            raise ApiError(400, f"limit must be between 1 and {MAX_LIMIT}")
        try:
            found = await self._messaging().read(account, q.get("chat") or None, since, limit)
        except WadaemonError as exc:
            raise ApiError(503, str(exc)) from None
        return _json(200, {"messages": found})

    async def _threads(self, request: web.Request) -> web.Response:
        account = self.account(request)
        try:
            return _json(200, {"threads": await self._messaging().threads(account)})
        except WadaemonError as exc:
            raise ApiError(503, str(exc)) from None

    async def _events(self, request: web.Request) -> web.StreamResponse:
        messaging = self._messaging()
        account = request.query.get("account", "")
        queue = messaging.subscribe()
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        try:
            await response.prepare(request)
            await response.write(json.dumps({"type": "subscribed"}).encode() + b"\n")
            while True:
                try:
                    event = await asyncio.wait_for(queue.get(), timeout=STREAM_KEEPALIVE_S)
                except asyncio.TimeoutError:
                    await response.write(b"\n")  # a blank line keeps the stream alive
                    continue
                if account and event.get("account") != account:
                    continue
                await response.write(json.dumps(event, ensure_ascii=False).encode() + b"\n")
        except (ConnectionError, asyncio.CancelledError):
            raise
        finally:
            messaging.unsubscribe(queue)
