"""The account supervisor: one WhatsApp client per account, started after the boot restore.

It sizes what the clients need (a thread of the loop's default executor each, descriptors), starts
the clients one at a time (the Go side keeps them in shared maps), runs the periodic per-account
health check, and stops every client on SIGTERM before the daemon's final backups.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import threading
from concurrent.futures import ThreadPoolExecutor

from wadaemon.config import WhatsAppConfig
from wadaemon.errors import WadaemonError
from wadaemon.whatsapp.account_runner import AccountRunner, RunnerHost
from wadaemon.whatsapp.client import ClientFactory, client_factory
from wadaemon.whatsapp.pairing import Pairing
from wadaemon.whatsapp.reachability import reachable

log = logging.getLogger("wadaemon.whatsapp")

SPARE_THREADS = 32  # for backups, store calls and neonize's own API calls (asyncio.to_thread)
FDS_PER_ACCOUNT = 16
FDS_BASE = 1024
STOP_ALL_TIMEOUT_S = 20.0


def raise_fd_limit(accounts: int) -> int:
    """Lift the soft descriptor limit to the hard one; returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    need = FDS_BASE + FDS_PER_ACCOUNT * accounts
    if soft != resource.RLIM_INFINITY and soft < need:
        log.warning(
            "the descriptor limit is %d, %d accounts want about %d: raise LimitNOFILE= in the "
            "unit (systemctl edit wadaemon)",
            soft,
            accounts,
            need,
        )
    return soft


def route_go_stdout() -> None:
    """Send what the Go library prints on stdout (it bypasses logging) to the daemon's log.

    Only stdout: the Go runtime's crash traces go to stderr, which must stay a direct line to the
    journal, or a crash would take its own explanation with it.
    """
    read_fd, write_fd = os.pipe()
    os.dup2(write_fd, 1)
    os.close(write_fd)
    go_log = logging.getLogger("whatsmeow.stdout")

    def pump() -> None:
        with os.fdopen(read_fd, "rb", buffering=0) as pipe:
            for line in iter(pipe.readline, b""):
                text = line.decode(errors="replace").rstrip()
                if text:
                    go_log.debug("%s", text)

    threading.Thread(target=pump, name="go-stdout", daemon=True).start()


class Supervisor:
    def __init__(
        self, host: RunnerHost, config: WhatsAppConfig, factory: ClientFactory | None = None
    ) -> None:
        self.host = host
        self.config = config
        self.factory = factory or client_factory(config.log_level)
        self.runners: dict[str, AccountRunner] = {}
        self._threads = 0
        self._checks: asyncio.Task[None] | None = None
        self.started = False

    def _size_for(self, accounts: int) -> None:
        """Each connected client holds one executor thread for its lifetime."""
        want = accounts + SPARE_THREADS
        if want > self._threads:
            self._threads = max(want, self._threads * 2)
            asyncio.get_running_loop().set_default_executor(
                ThreadPoolExecutor(max_workers=self._threads, thread_name_prefix="client")
            )

    def start(self, accounts: list[str]) -> None:
        raise_fd_limit(len(accounts))
        with contextlib.suppress(OSError):
            route_go_stdout()
        self._size_for(len(accounts))
        self.started = True
        for account in accounts:
            self.add(account)
        self._checks = asyncio.create_task(self._check_loop(), name="whatsapp-checks")
        log.info("whatsapp: supervising %d accounts", len(accounts))

    def add(self, account: str) -> AccountRunner:
        runner = self.runners.get(account)
        if runner is None:
            self._size_for(len(self.runners) + 1)
            probe = getattr(self.factory, "reachable", reachable)
            runner = AccountRunner(account, self.host, self.factory, self.config, probe=probe)
            self.runners[account] = runner
            if self.started:
                runner.start()
        return runner

    def pair(self, account: str, phone: str | None) -> Pairing:
        if not self.started:
            raise WadaemonError("the daemon is still starting; try again in a moment")
        return self.add(account).begin_pairing(phone)

    def session_changed(self, account: str) -> None:
        runner = self.runners.get(account)
        if runner is not None and runner.session_gone():
            runner.vanished()

    async def _check_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.health_check_seconds)
            for runner in list(self.runners.values()):
                try:
                    await runner.check()
                except Exception as exc:  # one account's check must not end the others'
                    log.error("%s: health check failed: %r", runner.account, exc)

    async def pause(self, account: str) -> None:
        """Stop the account's client (no logout) until `add` starts it again."""
        runner = self.runners.pop(account, None)
        if runner is not None:
            await runner.stop()

    async def remove(self, account: str) -> str:
        """Log out (if connected) and stop the account's client; a line saying what happened."""
        runner = self.runners.pop(account, None)
        if runner is None:
            return "no client ran for it"
        said = await runner.logout_for_removal()
        await runner.stop()
        return said

    async def stop(self) -> None:
        if self._checks is not None:
            self._checks.cancel()
        runners = list(self.runners.values())
        if not runners:
            return
        log.info("whatsapp: stopping %d clients", len(runners))
        _, pending = await asyncio.wait(
            [asyncio.create_task(r.stop()) for r in runners], timeout=STOP_ALL_TIMEOUT_S
        )
        if pending:
            log.warning("whatsapp: %d clients did not stop in time", len(pending))
