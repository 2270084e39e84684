"""Can WhatsApp's servers be reached at all? Asked before a retried connect.

A neonize connect() costs a database handle that is never released, so a retry while the network
is down would leak one per attempt. A TCP connection to the WebSocket endpoint (and nothing
more) tells whether trying makes sense.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket

WHATSAPP_HOST = "web.whatsapp.com"
WHATSAPP_PORT = 443
PROBE_TIMEOUT_S = 5.0


async def reachable(host: str = WHATSAPP_HOST, port: int = WHATSAPP_PORT) -> str | None:
    """None if a TCP connection to host:port succeeds, else why not (one line)."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), PROBE_TIMEOUT_S)
    except asyncio.TimeoutError:
        return f"no answer from {host}:{port} within {PROBE_TIMEOUT_S:.0f} s"
    except (OSError, socket.gaierror) as exc:
        return f"cannot reach {host}:{port}: {exc.strerror or exc}"
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return None
