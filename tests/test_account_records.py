"""Account records (wadaemon/account_records.py): the stop's flush and the coalescing writes."""

from __future__ import annotations

import asyncio
import threading
import time
import types
from typing import Any

import pytest

from wadaemon import account_records
from wadaemon.account_records import AccountRecords


class Store:
    """record_account() of the first record waits until no record is pending any more: the
    stop's flush is still writing it when the coalescing tasks wake, as on a busy machine."""

    def __init__(self) -> None:
        self.records: AccountRecords | None = None
        self.written: list[tuple[str, dict[str, object]]] = []
        self.lock = threading.Lock()

    def record_account(self, account: str, fields: dict[str, object]) -> None:
        with self.lock:
            first = not self.written
            self.written.append((account, fields))
        if first:
            assert self.records is not None
            deadline = time.monotonic() + 5
            while self.records._pending and time.monotonic() < deadline:
                time.sleep(0.01)


class Rt:
    def __init__(self, store: Store) -> None:
        self.replica = types.SimpleNamespace(store=store)
        self.tasks: list[asyncio.Task[Any]] = []

    def spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self.tasks.append(task)
        return task


def test_the_stop_flush_writes_each_record_once_while_the_coalescing_writes_wake(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(account_records, "RECORD_COALESCE_S", 0.2)
    store = Store()
    rt = Rt(store)

    async def main() -> None:
        records = AccountRecords(rt)  # type: ignore[arg-type]
        store.records = records
        for account in ("acct00", "acct01", "acct02"):
            records.record(account, {"status": "stopped"})  # each client stops
        await records.flush()  # the stop: the coalescing tasks wake during its first write
        await asyncio.gather(*rt.tasks)

    asyncio.run(main())
    accounts = sorted(account for account, _ in store.written)
    assert accounts == ["acct00", "acct01", "acct02"], store.written
    assert all(fields["status"] == "stopped" for _, fields in store.written)
