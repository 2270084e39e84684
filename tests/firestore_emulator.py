"""The real Cloud Firestore emulator, started once per test session (a pytest plugin).

`firestore_emulator` gives each test an emptied emulator, with $FIRESTORE_EMULATOR_HOST set for
the test's duration, and stop()/start() to cause an outage on the same port. Without Java or the
emulator the tests fail (they do not skip) and say how to install what is missing.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from wadaemon.store import DirectoryStore, Store
from wadaemon.store.firestore import FirestoreStore

JAR_ENV = "FIRESTORE_EMULATOR_JAR"
DEFAULT_JAR = Path(
    "/usr/lib/google-cloud-sdk/platform/cloud-firestore-emulator/cloud-firestore-emulator.jar"
)
MAIN_CLASS = "com.google.cloud.datastore.emulator.firestore.CloudFirestore"
PROJECT = "demo-wadaemon"
START_TIMEOUT = 60.0
INSTALL_HINT = (
    "install it with `apt-get install google-cloud-cli-firestore-emulator` from Google's Cloud "
    "SDK apt repository (https://cloud.google.com/sdk/docs/install#deb), or with "
    f"`gcloud components install cloud-firestore-emulator`, or point ${JAR_ENV} at the jar"
)


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM if pytest dies, so no emulator is left behind."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Emulator:
    """One emulator process on a fixed port; its data lives in memory only."""

    def __init__(self, jar: Path, java: str, port: int, log_path: Path) -> None:
        self.jar = jar
        self.java = java
        self.host = "127.0.0.1"
        self.port = port
        self.project = PROJECT
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> float:
        """Start the emulator and wait until it answers; returns the seconds that took."""
        assert not self.running(), "the emulator is already running"
        started = time.monotonic()
        with open(self.log_path, "ab") as log:
            command = [self.java, "-Duser.language=en", "-cp", str(self.jar), MAIN_CLASS]
            command += ["start", f"--host={self.host}", f"--port={self.port}"]
            self.proc = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent,
            )
        while time.monotonic() - started < START_TIMEOUT:
            if self.proc.poll() is not None:
                pytest.fail(
                    f"the Firestore emulator exited with status {self.proc.returncode} at start:\n"
                    + self.log_tail()
                )
            if self._answers():
                return time.monotonic() - started
            time.sleep(0.1)
        self.stop()
        pytest.fail(
            f"the Firestore emulator did not answer within {START_TIMEOUT:.0f} s:\n"
            + self.log_tail()
        )

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/", timeout=2) as resp:
                return bool(resp.read().strip() == b"Ok")
        except (OSError, urllib.error.URLError):
            return False

    def stop(self) -> None:
        """Stop the process: a real outage for every client (and the data is gone)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(15)
        self.proc = None

    def wipe(self) -> None:
        """Delete every document of the project (the emulator's own endpoint)."""
        path = f"/emulator/v1/projects/{self.project}/databases/(default)/documents"
        req = urllib.request.Request(self.url + path, method="DELETE")
        with urllib.request.urlopen(req, timeout=30) as resp:
            assert resp.status == 200, resp.status

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def find_emulator() -> tuple[str, Path]:
    jar = Path(os.environ.get(JAR_ENV) or DEFAULT_JAR)
    java = shutil.which("java")
    if java is None:
        pytest.fail(
            "the Firestore emulator tests need Java (a JRE 11 or newer): "
            "`apt-get install default-jre-headless`; scripts/test installs it when missing"
        )
    if not jar.is_file():
        pytest.fail(f"the Firestore emulator is not installed ({jar} is missing): {INSTALL_HINT}")
    return java, jar


@pytest.fixture(scope="session")
def firestore_emulator_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Emulator]:
    java, jar = find_emulator()
    log_path = tmp_path_factory.mktemp("firestore-emulator") / "emulator.log"
    emulator = Emulator(jar, java, free_port(), log_path)
    emulator.start()
    try:
        yield emulator
    finally:
        emulator.stop()


@pytest.fixture
def firestore_emulator(
    firestore_emulator_process: Emulator, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Emulator]:
    """An empty, running emulator, which the Google client library uses for this test."""
    emulator = firestore_emulator_process
    if not emulator.running():
        emulator.start()
    emulator.wipe()
    monkeypatch.setenv("FIRESTORE_EMULATOR_HOST", emulator.address)
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", emulator.project)
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    yield emulator
    if not emulator.running():  # a test that stopped it and failed before starting it again
        emulator.start()


@pytest.fixture(params=["directory", "firestore"])
def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """Each backend in turn: an empty backup directory, then the emulator."""
    if request.param == "directory":
        (tmp_path / "backups").mkdir()
        yield DirectoryStore(tmp_path / "backups")
        return
    emulator: Emulator = request.getfixturevalue("firestore_emulator")
    store = FirestoreStore(emulator.project, write_interval=0.05)
    yield store
    store.client.close()  # type: ignore[no-untyped-call]
