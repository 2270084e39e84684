"""Each account's metadata record in the store (accounts/{id} in Firestore): its status, the
host that drives it, its last backup and restore. Records from the WhatsApp clients are merged
and written at most once per second per account; the stop writes what is still pending."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Collection

from wadaemon.errors import WadaemonError
from wadaemon.runtime import Runtime

log = logging.getLogger("wadaemon")

RECORD_COALESCE_S = 1.0  # account records: at most one write per account per second
# what a backup changes (generation, lastBackupAt): at most one write per account per minute,
# so that a busy account's record costs no store write per generation
BACKUP_RECORD_EVERY_S = 60.0


class AccountRecords:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.host = socket.gethostname()
        self._pending: dict[str, dict[str, object]] = {}
        self._due: dict[str, float] = {}  # account -> loop time its pending record is written

    def record(
        self,
        account: str,
        fields: dict[str, object],
        within: float = RECORD_COALESCE_S,
        *,
        weak: Collection[str] = (),
    ) -> None:
        """Merge fields into the account's record, written within `within` seconds (with
        whatever else is merged meanwhile): one write per account per second at most, and
        for what changes with every backup, one a minute."""
        if self.rt.replica is None:
            return
        due = asyncio.get_running_loop().time() + within
        pending = self._pending.get(account)
        if pending is not None:
            # `weak` fields (a backup's status) do not replace what another record said
            pending.update({k: v for k, v in fields.items() if k not in weak or k not in pending})
            self._due[account] = min(self._due[account], due)
            return
        self._pending[account] = dict(fields)
        self._due[account] = due
        self.rt.spawn(self._write_later(account), f"record-{account}")

    async def _write_later(self, account: str) -> None:
        loop = asyncio.get_running_loop()
        while account in self._pending and loop.time() < self._due[account]:
            # woken every second at most: an earlier deadline merged meanwhile is kept
            await asyncio.sleep(min(RECORD_COALESCE_S, self._due[account] - loop.time()))
        fields = self._pending.pop(account, None)
        self._due.pop(account, None)
        if fields is not None:  # (None: the stop's flush took it meanwhile)
            await self.write(account, {"host": self.host, **fields})

    async def write(self, account: str, fields: dict[str, object]) -> None:
        """Update the account's metadata record in the store now."""
        if self.rt.replica is None:
            return
        try:
            await asyncio.to_thread(
                self.rt.replica.store.record_account, account, {"accountId": account, **fields}
            )
        except (WadaemonError, OSError) as exc:
            self.rt.metrics.store_errors.inc()
            log.warning("%s: cannot update the account record: %s", account, exc)

    async def flush(self) -> None:
        """Write every pending record now (the stop). Each write waits for the store: meanwhile
        the coalescing tasks may wake and take their records, so a record is taken only if it
        is still pending, and each is written once."""
        for account in list(self._pending):
            self._due.pop(account, None)
            fields = self._pending.pop(account, None)
            if fields is not None:
                await self.write(account, {"host": self.host, **fields})

    def forget(self, account: str) -> None:
        """Drop the account's pending record (a late "stopped" must not follow "removed")."""
        self._pending.pop(account, None)
        self._due.pop(account, None)
