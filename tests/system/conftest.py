"""System tests: the .deb installed in a real systemd (nspawn), one container per Debian release,
and its install step run with every Python it supports.

Not part of the normal `pytest` run: they need root, systemd-nspawn, the built package, the
previous per-release packages and cached root filesystems, which `packaging/test-system`
provides before it runs them with WADAEMON_SYSTEM_TESTS=1. Once that is set, anything missing
is an error, never a skip.

Environment (set by packaging/test-system):
    WADAEMON_SYSTEM_TESTS=1              collect and run these tests
    WADAEMON_RELEASES="bookworm trixie"  the releases to test
    WADAEMON_DEB=build/deb/wadaemon_0.1.0-2_amd64.deb    the package (one for every release)
    WADAEMON_PREVIOUS_DEB_DIR=DIR        the per-release packages it upgrades
                                         (wadaemon_*+deb12_*.deb, wadaemon_*+deb13_*.deb)
    WADAEMON_ROOTFS_<RELEASE>=DIR        the cached root filesystem to boot for each release
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

from system.nspawn import Container, Release

ENABLE_ENV = "WADAEMON_SYSTEM_TESTS"
ENABLED = os.environ.get(ENABLE_ENV) == "1"
TAGS = {"bookworm": "deb12", "trixie": "deb13"}

if not ENABLED:
    # `pytest` from the top of the repository does not even import the test modules
    collect_ignore_glob = ["test_*.py"]
else:
    # a timeout's SIGTERM unwinds like Ctrl-C, so the containers are shut down
    signal.signal(signal.SIGTERM, signal.default_int_handler)


def releases() -> list[str]:
    return os.environ.get("WADAEMON_RELEASES", "bookworm trixie").split()


TIMINGS: dict[str, dict[str, float]] = {}
FACTS: dict[str, dict[str, str]] = {}
FAILED: dict[str, str] = {}  # release -> first test that failed


def _require(condition: bool, message: str) -> None:
    if not condition:
        pytest.fail(f"{message} (packaging/test-system prepares it)", pytrace=False)


@pytest.fixture(scope="session", params=releases())
def release(request: pytest.FixtureRequest) -> Iterator[Release]:
    name: str = request.param
    _require(os.geteuid() == 0, "the system tests need root")
    _require(shutil.which("systemd-nspawn") is not None, "systemd-nspawn is not installed")
    _require(name in TAGS, f"unknown release {name!r}")
    deb = Path(os.environ.get("WADAEMON_DEB", "")).resolve()
    _require(deb.is_file() and deb.suffix == ".deb", "$WADAEMON_DEB does not name the package")
    previous_dir = Path(os.environ.get("WADAEMON_PREVIOUS_DEB_DIR", "")).resolve()
    previous = sorted(previous_dir.glob(f"wadaemon_*+{TAGS[name]}_*.deb"))
    _require(
        len(previous) == 1,
        f"expected one previous {name} package in $WADAEMON_PREVIOUS_DEB_DIR ({previous_dir})",
    )
    rootfs_env = f"WADAEMON_ROOTFS_{name.upper()}"
    rootfs = Path(os.environ.get(rootfs_env, ""))
    _require(
        bool(os.environ.get(rootfs_env)) and (rootfs / ".complete").is_file(),
        f"${rootfs_env} does not name a complete root filesystem",
    )
    logdir = Path(tempfile.mkdtemp(prefix=f"wadaemon-system-{name}-"))
    binds = [(deb.parent, "/pkg"), (previous_dir, "/previous")]
    container = Container(name, rootfs, binds, logdir / "nspawn.log")
    rel = Release(
        name,
        deb,
        container,
        f"/pkg/{deb.name}",
        f"/previous/{previous[0].name}",
        TIMINGS.setdefault(name, {}),
        FACTS.setdefault(name, {}),
    )
    try:
        rel.timings["boot"] = container.boot()
        yield rel
    finally:
        started = time.monotonic()
        container.shutdown()
        rel.timings["shutdown"] = time.monotonic() - started
        shutil.rmtree(logdir, ignore_errors=True)


# --- one scenario per release: a step whose predecessor failed is not run ---------------------


def _release_of(item: pytest.Item) -> str | None:
    callspec = getattr(item, "callspec", None)
    return callspec.params.get("release") if callspec else None


def pytest_runtest_setup(item: pytest.Item) -> None:
    name = _release_of(item)
    if name in FAILED:
        pytest.skip(f"not run: the earlier step {FAILED[name]} failed on {name}")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    name = _release_of(item)
    step = item.name.split("[")[0]
    if name and report.when == "call":
        TIMINGS.setdefault(name, {})[step] = report.duration
    if name and report.failed and name not in FAILED:
        FAILED[name] = step
    return report


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    tr = terminalreporter
    if FACTS:
        tr.section("measured")
        for name, facts in FACTS.items():
            for what, value in facts.items():
                tr.write_line(f"{name:<10} {what}: {value}")
    if not TIMINGS:
        return
    tr.section("timings (seconds)")
    names = list(TIMINGS)
    steps: list[str] = []
    for per in TIMINGS.values():
        steps += [s for s in per if s not in steps]
    tr.write_line(f"{'step':<52}" + "".join(f"{n:>12}" for n in names))
    for step in steps:
        cells = "".join(
            f"{TIMINGS[n][step]:>12.1f}" if step in TIMINGS[n] else f"{'-':>12}" for n in names
        )
        tr.write_line(f"{step:<52}{cells}")
    totals = [sum(v for k, v in TIMINGS[n].items() if not k.startswith(" ")) for n in names]
    tr.write_line(f"{'total':<52}" + "".join(f"{t:>12.1f}" for t in totals))
