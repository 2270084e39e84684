"""The stop sequence (Daemon._stop), in process: a step that fails does not skip the others."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from conftest import Env, make_db

from wadaemon.config import load_config
from wadaemon.daemon import Daemon, keyring_for


class FailingMessaging:
    """Stands for the message path: both of its stop steps fail, as a bug would."""

    async def stop_sending(self) -> None:
        raise RuntimeError("stop_sending broke")

    async def close(self) -> None:
        raise asyncio.CancelledError  # an await on something another task cancelled


def test_a_failing_stop_step_skips_neither_the_final_backups_nor_the_records_nor_the_store(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    env.write_config(debounce_seconds=3600)  # a change waits for the stop's final backups
    make_db(env.sessions / "alice" / "session.db")
    config = load_config(env.config)
    daemon = Daemon(config, keyring_for(config))
    closed: list[bool] = []
    assert daemon.replica is not None
    store = daemon.replica.store
    real_close = store.close

    def close() -> None:
        closed.append(True)
        real_close()

    store.close = close  # type: ignore[method-assign]
    written: list[tuple[str, dict[str, Any]]] = []

    async def write(account: str, fields: dict[str, Any]) -> None:
        written.append((account, fields))

    daemon.records.write = write  # type: ignore[method-assign]

    async def main() -> int:
        run = asyncio.create_task(daemon.run())
        while daemon.state.phase != "running":
            assert not run.done(), run
            await asyncio.sleep(0.05)
        await daemon.backups.backup_at_once("alice", "test")  # generation 1
        assert env.head_generation("alice") == 1
        make_db(env.sessions / "alice" / "session.db", rows=10)  # changed: a backup is due
        daemon.records.record("alice", {"status": "stopped"})
        daemon.messaging = FailingMessaging()  # type: ignore[assignment]
        daemon.request_stop("test")
        return await run

    loop = asyncio.new_event_loop()
    try:
        with caplog.at_level(logging.INFO, logger="wadaemon"):
            code = loop.run_until_complete(asyncio.wait_for(main(), 60))
    finally:
        loop.close()  # (what a broken stop left running must not hang the test)
    assert code == 1
    assert "stopping: stopping the sends failed; the stop goes on" in caplog.text
    assert "stopping: writing the waiting messages was cancelled; the stop goes on" in caplog.text
    assert env.head_generation("alice") == 2  # the final backup happened
    assert ("alice", "stopped") in [(a, f.get("status")) for a, f in written]  # the record
    assert closed == [True]  # the store wrote what it held and closed
