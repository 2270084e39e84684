"""Stored changes as events for readers (the event stream on the control socket, the webhooks),
each with a stable id: the same change always has the same id, so receivers can de-duplicate."""

from __future__ import annotations

from typing import Any

from wadaemon.messages.model import Change, ChatRead, Message, Receipt
from wadaemon.messages.store import OutboxEntry


def event_of(change: Change) -> dict[str, Any]:
    """A change as an event for readers, with a stable id (the same change: the same id)."""
    if isinstance(change, Message):
        return {
            **change.to_json(),
            "id": f"message:{change.account}:{change.chat}:{change.sender}:{change.id}",
            "type": "message",
            "wa_id": change.id,  # WhatsApp's id of the message ("id" is the event's)
        }
    if isinstance(change, Receipt):
        ids = ",".join(change.ids)
        return {
            "id": f"receipt:{change.account}:{change.chat}:{change.status}:{ids}",
            "type": "receipt",
            **change.to_json(),
        }
    assert isinstance(change, ChatRead)
    return {
        "id": f"read:{change.account}:{change.chat}:{change.timestamp:.0f}",
        "type": "read",
        **change.to_json(),
    }


def outbox_event(entry: OutboxEntry) -> dict[str, Any]:
    return {
        "id": f"outbox:{entry.key}:{entry.state}:{entry.attempts}",
        "type": "outbox",
        **entry.to_json(),
    }
