"""The boundary between the account supervisor and a WhatsApp client library.

A client drives one account's session database. It reports everything that happens as neonize
event objects (protobuf messages from `neonize.proto.Neonize_pb2`: Connected, PairStatus,
LoggedOut, StreamReplaced, TemporaryBan, ConnectFailure, Disconnected, KeepAliveTimeout, and QR
with the current code) through one callback, the event sink. The real client is
`NeonizeClient`; tests put a fake behind this same boundary, because WhatsApp's servers cannot
be reached from a test machine.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from wadaemon.errors import WadaemonError

EventSink = Callable[[Any], None]  # receives a neonize protobuf event object
CLIENT_FACTORY_ENV = "WADAEMON_WHATSAPP_CLIENT"  # "module:callable", for tests only


class ConnectError(WadaemonError):
    """The client could not connect (network, server refusal); the caller retries."""


class SendFailed(WadaemonError):
    """A send that failed. `kind` says what a retry would do:
    transient  nothing reached WhatsApp (not connected, refused, a server error): retry later;
    permanent  it can never be sent as asked (invalid number, not on WhatsApp, logged out);
    ambiguous  it may have been sent (the server's acknowledgement timed out): a retry could
               send it twice.
    """

    def __init__(self, reason: str, kind: str) -> None:
        super().__init__(reason)
        self.kind = kind


@dataclass(frozen=True)
class Sent:
    id: str  # WhatsApp's message id
    timestamp: float  # WhatsApp's, seconds since the epoch
    chat: str  # the JID it went to


PERMANENT_SEND_ERRORS = (
    "not logged in",
    "doesn't contain a device",
    "logged out",
    "invalid",
    "not on whatsapp",
    "no such",
    "bad request",
    "server returned error 4",
)


def classify_send_error(error: str) -> SendFailed:
    """whatsmeow's error text (through neonize) as a SendFailed of the right kind."""
    low = error.lower()
    if any(w in low for w in ("timed out", "timeout", "deadline exceeded")):
        kind = "ambiguous"  # the request may have reached the server
    elif any(w in low for w in PERMANENT_SEND_ERRORS):
        kind = "permanent"  # logged out, a bad recipient, the server refused it (4xx)
    else:
        kind = "transient"  # not connected, a server error (5xx), a refused connection
    return SendFailed(error or "send failed", kind)


class WhatsAppClient(Protocol):
    async def run(self) -> None:
        """Connect and keep the session until stop(); returns after stop().

        Raises ConnectError when the first connection fails (whatsmeow retries by itself only
        after a successful login). An unpaired database starts a pairing: QR events follow.
        """
        ...

    async def stop(self) -> None:
        """Disconnect and make run() return. Safe to call at any time, more than once."""
        ...

    async def pair_phone(self, phone: str) -> str:
        """A pairing code for `phone` (digits with country code); only after the first QR."""
        ...

    async def logout(self) -> None:
        """Unlink this device on the server (the phone no longer lists it)."""
        ...

    async def is_connected(self) -> bool: ...

    async def download(self, message: Any) -> bytes:
        """The media content of a message (the E2E Message of a neonize Message event);
        WadaemonError if it cannot be had (expired on WhatsApp's servers, not connected)."""
        ...

    async def send_text(self, to: str, text: str, reply_to: str = "") -> Sent:
        """Send a text message to a phone number (digits with country code) or a JID, quoting
        the message `reply_to` of that chat if given. Raises SendFailed."""
        ...


ClientFactory = Callable[[str, Path, EventSink], WhatsAppClient]
# A factory may also have `async reachable() -> str | None`: can its servers be reached (None) or
# why not. The default asks whether web.whatsapp.com:443 accepts a TCP connection.


def client_factory(go_log_level: str) -> ClientFactory:
    """The real neonize client, or the one named by $WADAEMON_WHATSAPP_CLIENT (tests).

    Call it once logging is set up: it imports neonize, which touches the logging setup.
    """
    from wadaemon.whatsapp.neonize_client import (
        NeonizeClient,
        load_neonize,
        neonize_on_python310,
    )

    neonize_on_python310()  # a test's client uses neonize's messages too
    spec = os.environ.get(CLIENT_FACTORY_ENV, "")
    if not spec:
        try:
            load_neonize(go_log_level)
        except (ImportError, OSError) as exc:
            raise WadaemonError(
                f"cannot load the WhatsApp library (neonize): {exc}; install the system "
                "library it names (libmagic1: `apt install libmagic1`), or set "
                "whatsapp.enabled: false to run as a sidecar"
            ) from None
        return NeonizeClient
    module_name, _, attr = spec.partition(":")
    import importlib

    try:
        factory: ClientFactory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise WadaemonError(
            f"${CLIENT_FACTORY_ENV}={spec!r}: cannot load it ({exc}); unset it to use neonize"
        ) from None
    return factory
