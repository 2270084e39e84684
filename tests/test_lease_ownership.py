"""The lease keeper's start (wadaemon/lease_ownership.py), with a fake lease store."""

from __future__ import annotations

import asyncio
import types
from pathlib import Path
from typing import Any

import pytest

from wadaemon.lease_ownership import LeaseOwnership
from wadaemon.store.base import StoreError


class InUse:
    """Another live instance uses this id: the uniqueness check refuses every time."""

    instance = "i1"

    def __init__(self) -> None:
        self.announced = 0

    def check_unique(self, host: str, sessions: str) -> None:
        raise StoreError("instance id 'i1' is in use by a live instance on host other")

    def announce(self, host: str, sessions: str, held: int) -> None:
        self.announced += 1

    def stop_watching(self) -> None:
        pass

    def leave(self) -> None:
        pass


def config(renew: float) -> Any:
    return types.SimpleNamespace(
        leases=types.SimpleNamespace(ttl_seconds=3 * renew, renew_seconds=renew),
        instance=types.SimpleNamespace(max_accounts=0),
        sessions_path=Path("/nonexistent/sessions"),
    )


def test_an_instance_refused_for_its_id_never_announces_itself() -> None:
    """Announced while refused, it would overwrite the live instance's announcement with its
    own, then pass the check at its next try and take that instance's leases."""
    leases = InUse()
    ownership = LeaseOwnership(leases, config(renew=0.05), host=None)  # type: ignore[arg-type]

    async def main() -> None:
        for _ in range(3):  # DrivenAccounts.start tries again and again
            with pytest.raises(StoreError, match="in use by a live instance"):
                await ownership.start()
            await asyncio.sleep(0.4)  # several renewal periods
        await ownership.stop()

    asyncio.run(main())
    assert leases.announced == 0
