"""packaging/build-deb needs no root and is reproducible: built again by an unprivileged user, in
a clean environment, another home and another cache directory, the package is byte for byte the
one under test (built from the same tree by packaging/test-system)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NOBODY = 65534


@pytest.fixture
def nobodys_dir() -> Iterator[Path]:
    """A directory the unprivileged user can reach (pytest's tmp_path is root's, mode 0700)."""
    path = Path(tempfile.mkdtemp(prefix="wadaemon-build-test-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_build_as_an_unprivileged_user_gives_the_same_bytes(nobodys_dir: Path) -> None:
    tmp_path = nobodys_dir
    deb = Path(os.environ.get("WADAEMON_DEB", ""))
    if not deb.is_file():
        pytest.fail("$WADAEMON_DEB does not name the package (packaging/test-system sets it)")
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.fail("this test drops to an unprivileged user: it needs root and setpriv")
    home = tmp_path / "home"
    cache = home / "cache"
    cache.mkdir(parents=True)
    given = Path(os.environ.get("WADAEMON_BUILD_CACHE", "/nonexistent")) / "files"
    if given.is_dir():  # the wheels already downloaded (checked by hash again by the build)
        shutil.copytree(given, cache / "files")
    subprocess.run(["chown", "-R", f"{NOBODY}:{NOBODY}", str(tmp_path)], check=True)
    tmp_path.chmod(0o755)
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(home),
        "WADAEMON_BUILD_CACHE": str(cache),
        # the clone belongs to root: let git list its files for another user
        "GIT_CONFIG_COUNT": "1",
        "GIT_CONFIG_KEY_0": "safe.directory",
        "GIT_CONFIG_VALUE_0": "*",
    }
    for proxy in ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        if proxy in os.environ:
            env[proxy] = os.environ[proxy]
    out = home / "out"
    built = subprocess.run(
        [
            "setpriv",
            f"--reuid={NOBODY}",
            f"--regid={NOBODY}",
            "--clear-groups",
            str(ROOT / "packaging/build-deb"),
            "--out",
            str(out),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    again = out / deb.name
    digest = hashlib.sha256(again.read_bytes()).hexdigest()
    assert digest == hashlib.sha256(deb.read_bytes()).hexdigest(), (
        f"{again} differs from {deb}: the build is not reproducible (or the tree changed since "
        "the package was built)"
    )
    print(f"built again as uid {NOBODY}: {deb.name}, sha256 {digest}")
