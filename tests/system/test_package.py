"""The .deb in a real systemd, one booted container per Debian release, as an admin would use it.

The tests are steps of one scenario and run in this order on each release: install, look at
it, back up, lose the session, restore, hang the daemon, reload, upgrade, remove, purge and
reinstall, then the release's previous per-release package over the kept data and the upgrade
from it. A step whose predecessor failed is reported as not run.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

from system.nspawn import Container, Release, message, wait_for

SESSIONS = "/var/lib/wadaemon/sessions"
BACKUPS = "/var/backups/wadaemon"
SOCKET = "/run/wadaemon/wadaemon.sock"
KEY = "/etc/wadaemon/session.key"
CONFIG = "/etc/wadaemon/wadaemon.yaml"
VENV_PYTHON = "/opt/venvs/wadaemon/bin/python"
MAX_EXPOSURE = 2.0
ACCOUNT = "alice"
TEST_DROPIN = "/run/systemd/system/wadaemon.service.d/90-test.conf"
PROBE = Path(__file__).with_name("hardening_probe.py")
CHECK_VENV = "/usr/lib/wadaemon/check-venv.py"
INSTALL_VENV = "/usr/lib/wadaemon/install-venv"
GO_LIBRARY = "neonize/neonize-linux-amd64.so"
NEW_ACCOUNT = "acc1"
# a Python traceback, or a Go panic or runtime crash, anywhere in the daemon's journal
CRASH = re.compile(r"Traceback \(most recent call last\)|^panic: |^fatal error: |^goroutine \d+ \[")

# A session as a WhatsApp client leaves it: a WAL-mode SQLite database and a JSON file, written
# by the daemon's user (never by root: root-owned -wal/-shm files would lock the daemon out).
MAKE_SESSION = """
import json, os, sqlite3, sys
path = sys.argv[1]
os.makedirs(path, mode=0o700, exist_ok=True)
db = sqlite3.connect(os.path.join(path, "session.db"))
db.execute("PRAGMA journal_mode=wal")
db.execute("CREATE TABLE IF NOT EXISTS keys (id INTEGER PRIMARY KEY, k BLOB)")
db.executemany("INSERT INTO keys (k) VALUES (?)", [(os.urandom(300),) for _ in range(200)])
db.commit()
db.close()
with open(os.path.join(path, "creds.json"), "w") as fh:
    json.dump({"me": sys.argv[2]}, fh)
"""
DESCRIBE_SESSION = """
import hashlib, json, os, sqlite3, sys
path = sys.argv[1]
db = sqlite3.connect(f"file:{os.path.join(path, 'session.db')}?mode=ro", uri=True)
rows, digest = db.execute("SELECT count(*), sum(length(k)) FROM keys").fetchone()
ok = db.execute("PRAGMA integrity_check").fetchone()[0]
db.close()
creds = open(os.path.join(path, "creds.json"), "rb").read()
print(json.dumps({"rows": rows, "bytes": digest, "integrity": ok,
                  "creds_sha256": hashlib.sha256(creds).hexdigest()}))
"""


# --- helpers -----------------------------------------------------------------------------------


def active(c: Container) -> str:
    return c.run("systemctl", "is-active", "wadaemon", check=False).stdout.strip()


def wait_active(c: Container, timeout: float = 60.0) -> None:
    wait_for(lambda: active(c) == "active", timeout, "wadaemon.service to be active")


def assert_active(c: Container) -> None:
    """wadaemon.service is active; if not, the failure shows why (status and journal)."""
    state = active(c)
    if state != "active":
        status = c.run("systemctl", "status", "wadaemon", "--no-pager", check=False).stdout
        journal = c.run("journalctl", "--unit=wadaemon", "--lines=40", "--no-pager").stdout
        raise AssertionError(f"wadaemon.service is {state}\n{status}\n{journal}")


def exposure(output: str) -> float:
    found = re.search(r"Overall exposure level for wadaemon\.service: ([0-9.]+)", output)
    assert found, f"no exposure level in:\n{output}"
    return float(found.group(1))


def stat(c: Container, path: str) -> str:
    return c.run("stat", "-c", "%a %U %G", path).stdout.strip()


def open_files(limits: str) -> tuple[int, int]:
    """(soft, hard) `Max open files` from a /proc/PID/limits text."""
    found = re.search(r"^Max open files\s+(\d+)\s+(\d+)\s", limits, re.MULTILINE)
    assert found, limits
    return int(found.group(1)), int(found.group(2))


def as_daemon_user(c: Container, script: str, *args: str) -> str:
    """Run a Python script in the container as the daemon's user (as its clients write)."""
    return c.run("runuser", "-u", "wadaemon", "--", "python3", "-c", script, *args).stdout


def make_session(c: Container, label: str) -> None:
    """Write (or add to) ACCOUNT's session as its client would."""
    as_daemon_user(c, MAKE_SESSION, f"{SESSIONS}/{ACCOUNT}", label)


def session_facts(c: Container, account: str = ACCOUNT) -> dict[str, Any]:
    out = as_daemon_user(c, DESCRIBE_SESSION, f"{SESSIONS}/{account}")
    facts: dict[str, Any] = json.loads(out)
    return facts


def backups_settled(c: Container) -> bool:
    """Every account has had a backup attempt, and none is running or pending."""
    r = c.run("wadaemon", "status", "--json", check=False)
    if r.returncode not in (0, 1):  # 1: answered, but some check is failing
        return False
    accounts = json.loads(r.stdout)["accounts"].values()
    return all(
        a["last_backup_result"] is not None
        and a["backup_running_seconds"] is None
        and a["pending_since_seconds"] is None
        for a in accounts
    )


def generations(c: Container, account: str = ACCOUNT) -> dict[str, Any] | None:
    r = c.run("wadaemon", "generations", account, "--json", check=False)
    if r.returncode != 0:
        return None
    doc: dict[str, Any] = json.loads(r.stdout)
    return doc


def head_creds_sha(c: Container, account: str = ACCOUNT) -> str | None:
    doc = generations(c, account)
    if not doc:
        return None
    head = next(g for g in doc["generations"] if g["head"])
    return str(next(f["sha256"] for f in head["files"] if f["path"] == "creds.json"))


def curl(
    c: Container, path: str, *, method: str = "GET", user: str | None = None
) -> tuple[int, str]:
    cmd = [
        "curl",
        "-sS",
        "-X",
        method,
        "-w",
        "\n%{http_code}",
        "--unix-socket",
        SOCKET,
        f"http://localhost{path}",
    ]
    if user:
        cmd = ["runuser", "-u", user, "--", *cmd]
    r = c.run(*cmd, check=False)
    body, _, code = r.stdout.rpartition("\n")
    return (int(code) if code.isdigit() else 0), body + r.stderr


def daemon_entries(c: Container, after: str | None = None) -> list[dict[str, Any]]:
    """The unit's journal entries (the daemon's and systemd's about it), oldest first."""
    return c.journal("--unit=wadaemon", after=after)


def index_of(entries: list[dict[str, Any]], pattern: str, start: int = 0) -> int:
    for i in range(start, len(entries)):
        if re.search(pattern, message(entries[i])):
            return i
    shown = "\n".join(f"  [{e.get('PRIORITY')}] {message(e)}" for e in entries)
    raise AssertionError(f"no journal entry matches {pattern!r} after #{start}:\n{shown}")


def timed(release: Release, name: str, seconds: float) -> None:
    release.timings[f"  {name}"] = seconds  # indented: a part of a step, not summed
    print(f"[{release.name}] {name}: {seconds:.1f} s")


# --- the scenario ------------------------------------------------------------------------------


def test_package_unit_is_hardened(release: Release) -> None:
    """Static checks on the unpacked package: the unit, its drop-in, the exposure score."""
    c = release.container
    c.run("dpkg-deb", "-x", release.deb_inside, "/tmp/unpacked")
    units = c.run("find", "/tmp/unpacked", "-path", "*/systemd/system/*", "-type", "f").stdout
    unit = next(p for p in units.split() if p.endswith("/wadaemon.service"))
    assert f"{Path(unit).parent}/wadaemon.service.d/10-sessions.conf" in units.split()
    out = c.run(
        "systemd-analyze",
        "security",
        "--offline=true",
        "--root=/tmp/unpacked",
        "wadaemon.service",
    ).stdout
    score = exposure(out)
    release.facts["exposure, packaged unit (offline)"] = str(score)
    assert score <= MAX_EXPOSURE, out


def test_install(release: Release) -> None:
    c = release.container
    started = time.monotonic()
    r = c.run(
        "apt-get", "install", "--yes", "--no-install-recommends", release.deb_inside, timeout=300
    )
    timed(release, "apt install (until READY)", time.monotonic() - started)
    out = r.stdout + r.stderr
    # a new key, and the admin is told to keep a copy
    assert f"created the encryption key {KEY}" in out, out
    assert "without it no backup can be restored" in out
    assert_active(c)
    assert c.run("systemctl", "is-enabled", "wadaemon").stdout.strip() == "enabled"


def test_files_user_and_modes(release: Release) -> None:
    c = release.container
    user = c.run("getent", "passwd", "wadaemon").stdout.strip().split(":")
    assert int(user[2]) < 1000 and user[5] == "/var/lib/wadaemon" and user[6] == "/usr/sbin/nologin"
    assert stat(c, SESSIONS) == "700 wadaemon wadaemon"
    assert stat(c, "/var/lib/wadaemon") == "700 wadaemon wadaemon"
    assert stat(c, BACKUPS) == "700 wadaemon wadaemon"
    assert stat(c, KEY) == "600 root root"
    assert stat(c, CONFIG) == "644 root root"
    assert stat(c, "/run/wadaemon") == "750 wadaemon wadaemon"
    assert stat(c, SOCKET) == "660 wadaemon wadaemon"
    assert c.run("sh", "-c", "command -v wadaemon").stdout.strip() == "/usr/bin/wadaemon"
    assert c.run("wadaemon", "--version").stdout.startswith("wadaemon ")
    conffiles = c.run("dpkg-query", "-W", "-f=${Conffiles}", "wadaemon").stdout
    assert CONFIG in conffiles
    depends = c.run("dpkg-query", "-W", "-f=${Depends}", "wadaemon").stdout
    # one package for every release: python3 of any supported minor version, not one of them
    assert "python3 (>= 3.10), python3 (<< 3.14)" in depends, depends
    assert not re.search(r"\bpython3\.\d+\b", depends) and "libc6 (>= 2.34)" in depends, depends
    release.facts["package"] = f"{Path(release.deb).name}, Depends: {depends}"
    # the daemon runs the virtualenv postinst built for this release's python3, from the
    # carried wheels; dpkg owns the wheels, not the virtualenv
    python3 = c.run("readlink", "-f", "/usr/bin/python3").stdout.strip()
    assert c.run("readlink", "-f", VENV_PYTHON).stdout.strip() == python3
    c.run(INSTALL_VENV, "--check")
    assert c.run("dpkg", "-S", VENV_PYTHON, check=False).returncode == 1
    c.run("dpkg", "-S", "/usr/lib/wadaemon/wheels")
    release.facts["virtualenv"] = f"{python3}: {c.read('/opt/venvs/wadaemon/wadaemon-venv.txt')}"


def test_systemd_analyze_verify_is_clean(release: Release) -> None:
    c = release.container
    r = c.run("systemd-analyze", "verify", "wadaemon.service", check=False)
    noise = [
        line
        for line in (r.stdout + r.stderr).splitlines()
        if line.strip() and "Unit sysinit.target not found" not in line
    ]
    assert r.returncode == 0 and not noise, "\n".join(noise)
    score = exposure(c.run("systemd-analyze", "security", "wadaemon.service").stdout)
    release.facts["exposure, installed unit"] = str(score)
    release.facts["systemd"] = c.run("systemctl", "--version").stdout.split("\n")[0]
    assert score <= MAX_EXPOSURE


def test_status_shows_status_line_and_dropin(release: Release) -> None:
    c = release.container
    out = c.run("systemctl", "status", "wadaemon", "--no-pager", "--lines=0").stdout
    print(out)
    assert re.search(r"Drop-In: \S+/wadaemon\.service\.d\n\s+\S+10-sessions\.conf", out), out
    status = re.search(r'Status: "(.+)"', out)
    assert status and "accounts" in status.group(1), out
    assert "Active: active (running)" in out


def test_sessions_path_is_the_dropins(release: Release) -> None:
    c = release.container
    props = c.show("wadaemon", "Environment", "DropInPaths", "MainPID")
    assert "SESSIONS_PATH=/var/lib/wadaemon/sessions" in props["Environment"].split()
    assert props["DropInPaths"].endswith("wadaemon.service.d/10-sessions.conf")
    environ = c.read(f"/proc/{props['MainPID']}/environ").split("\0")
    assert "SESSIONS_PATH=/var/lib/wadaemon/sessions" in environ
    started = c.messages("--unit=wadaemon", "--grep=starting: sessions")
    assert started and "starting: sessions /var/lib/wadaemon/sessions," in started[-1]


def test_status_command_and_health_socket(release: Release) -> None:
    c = release.container
    out = c.run("wadaemon", "status").stdout
    assert re.match(r"wadaemon \S+: (ok|degraded) \(running\)", out), out
    code, body = curl(c, "/health")
    assert code == 200 and json.loads(body)["status"] in ("ok", "degraded"), body
    # members of the group wadaemon may control the daemon; other users cannot even connect
    c.run("useradd", "--create-home", "--no-user-group", "--groups", "wadaemon", "operator")
    c.run("useradd", "--create-home", "--no-user-group", "stranger")
    code, body = curl(c, "/accounts", user="operator")
    assert code == 200, body
    assert c.run("runuser", "-u", "operator", "--", "wadaemon", "status").returncode == 0
    r = c.run(
        "runuser",
        "-u",
        "stranger",
        "--",
        "curl",
        "-sS",
        "--unix-socket",
        SOCKET,
        "http://localhost/health",
        check=False,
    )
    assert r.returncode == 7, (r.returncode, r.stdout, r.stderr)  # could not connect


def test_journal_priorities(release: Release) -> None:
    c = release.container
    entries = [e for e in daemon_entries(c) if e.get("SYSLOG_IDENTIFIER") == "wadaemon"]
    assert entries, "the daemon logged nothing"
    for e in entries:  # journald parsed the <N> prefixes; none is left in a message
        assert not re.match(r"<\d>", message(e)), message(e)
    order = ["starting: sessions", "control socket listening", "restore: ", "ready: "]
    at = 0
    for pattern in order:
        at = index_of(entries, re.escape(pattern), at)
        assert entries[at]["PRIORITY"] == "6", entries[at]
    warnings = c.messages("--unit=wadaemon", "--priority=warning")
    infos = c.messages("--unit=wadaemon", "--priority=info")
    assert not any(m.startswith("ready: ") for m in warnings)
    assert any(m.startswith("ready: ") for m in infos)
    for e in entries:
        if e["PRIORITY"] in ("0", "1", "2", "3", "4"):
            assert message(e) in warnings


def test_hardening_keeps_ctypes_and_extensions_working(release: Release) -> None:
    """A oneshot unit with every [Service] setting of the installed unit (MemoryDenyWriteExecute=
    included) runs the probe with the virtualenv's Python."""
    c = release.container
    path = c.show("wadaemon", "FragmentPath")["FragmentPath"]
    skip = (
        "Type",
        "NotifyAccess",
        "ExecStart",
        "ExecReload",
        "WatchdogSec",
        "Restart",
        "RestartSec",
        "RestartPreventExitStatus",
        "TimeoutStartSec",
        "TimeoutStopSec",
        "SyslogIdentifier",
        # systemd deletes a unit's RuntimeDirectory= when it stops: the probe's would be the
        # daemon's /run/wadaemon, socket included
        "RuntimeDirectory",
        "RuntimeDirectoryMode",
    )
    lines, section = [], ""
    for line in c.read(path).splitlines():
        if line.startswith("["):
            section = line
        elif (
            section == "[Service]"
            and "=" in line
            and not line.startswith("#")
            and line.split("=", 1)[0] not in skip
        ):
            lines.append(line)
    assert "MemoryDenyWriteExecute=yes" in lines
    c.write("/usr/local/lib/wadaemon-hardening-probe.py", PROBE.read_text())
    unit = "\n".join(
        [
            "[Service]",
            "Type=oneshot",
            "SyslogIdentifier=wadaemon-probe",
            f"ExecStart={VENV_PYTHON} /usr/local/lib/wadaemon-hardening-probe.py",
            *lines,
            "",
        ]
    )
    c.write("/run/systemd/system/wadaemon-probe.service", unit)
    c.run("systemctl", "daemon-reload")
    c.run("systemctl", "start", "wadaemon-probe.service", check=False, timeout=120)
    result = c.show("wadaemon-probe", "Result", "ExecMainStatus")
    said = c.messages("--unit=wadaemon-probe", "--identifier=wadaemon-probe")
    release.facts["probe under the unit's hardening"] = next(
        (m for m in said if "probe:" in m), str(said)
    )
    assert result == {"Result": "success", "ExecMainStatus": "0"}, (result, said)
    assert any("failures: none" in m for m in said)
    c.run("test", "-S", SOCKET)  # the daemon's socket is still there


def test_whatsapp_clients_run_under_the_unit(release: Release) -> None:
    """The shipped configuration runs WhatsApp clients: the daemon has neonize's Go library
    loaded, the wheel's file, unchanged, with the descriptor limit of the unit."""
    c = release.container
    enabled = c.run(
        VENV_PYTHON, "-c", f"import yaml; print(yaml.safe_load(open('{CONFIG}'))['whatsapp'])"
    ).stdout
    assert "'enabled': True" in enabled, enabled
    assert_active(c)
    pid = c.show("wadaemon", "MainPID")["MainPID"]
    assert c.messages("--unit=wadaemon", "--grep=^whatsapp: supervising \\d+ accounts")
    # messages under the hardened unit: the embedded store opens in the state directory, the
    # health check says so, and `wadaemon messages` reads it through the socket
    assert c.messages(
        "--unit=wadaemon", "--grep=^messages: stored in embedded message store /var/lib/wadaemon/"
    )
    code, body = curl(c, "/health")
    assert code == 200 and json.loads(body)["checks"]["messages"]["status"] == "ok", body
    r = c.run("wadaemon", "messages", "nobody", check=False)
    assert r.returncode == 0 and r.stdout == "", r.stdout + r.stderr
    maps = c.read(f"/proc/{pid}/maps")
    loaded = {line.split()[-1] for line in maps.splitlines() if GO_LIBRARY in line}
    assert len(loaded) == 1 and next(iter(loaded)).startswith("/opt/venvs/wadaemon/"), loaded
    # LimitNOFILE=65536, or as close as the container's own hard limit allows (systemd clamps)
    assert c.show("wadaemon", "LimitNOFILE")["LimitNOFILE"] == "65536"
    ceiling = open_files(c.read("/proc/1/limits"))[1]
    limits = open_files(c.read(f"/proc/{pid}/limits"))
    assert limits == (min(65536, ceiling),) * 2, (limits, ceiling)
    release.facts["daemon's descriptor limit"] = f"{limits[0]} (container's hard limit {ceiling})"
    # every file of the virtualenv is its wheel's, and the Go library reports the version
    # neonize expects: no download, ever
    said = c.run(VENV_PYTHON, "-B", CHECK_VENV, "/opt/venvs/wadaemon").stdout
    assert "files match their wheels' RECORD" in said and "is the wheel's" in said, said
    assert c.run("dpkg", "--verify", "wadaemon").stdout == ""  # no packaged file changed
    downloads = [m for m in c.messages("--unit=wadaemon") if "download" in m.lower()]
    assert not downloads, downloads
    status = c.read(f"/proc/{pid}/status")
    rss = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
    threads = re.search(r"^Threads:\s+(\d+)", status, re.MULTILINE)
    fds = c.run("ls", f"/proc/{pid}/fd").stdout.split()
    release.facts["daemon with WhatsApp clients, no account"] = (
        f"RSS {int(rss.group(1)) // 1024 if rss else '?'} MiB, "
        f"{threads.group(1) if threads else '?'} threads, {len(fds)} descriptors"
    )
    release.facts["virtualenv check"] = " / ".join(said.strip().splitlines())


def test_accounts_list_without_accounts(release: Release) -> None:
    c = release.container
    r = c.run("wadaemon", "accounts", "list")
    assert "no accounts" in r.stdout, r.stdout
    assert json.loads(c.run("wadaemon", "accounts", "list", "--json").stdout) == []


def test_accounts_add_without_network_fails_fast(release: Release) -> None:
    """The container has no network: pairing must say so quickly, not hang or kill the daemon."""
    c = release.container
    pid = c.show("wadaemon", "MainPID")["MainPID"]
    started = time.monotonic()
    r = c.run("wadaemon", "accounts", "add", NEW_ACCOUNT, check=False, input="", timeout=60)
    seconds = time.monotonic() - started
    timed(release, "accounts add, no network (exit 1)", seconds)
    out = r.stdout + r.stderr
    assert r.returncode == 1 and "cannot connect to WhatsApp" in out, (r.returncode, out)
    release.facts["accounts add without network"] = f"{seconds:.1f} s: {r.stderr.strip()}"
    assert_active(c)
    assert c.show("wadaemon", "MainPID")["MainPID"] == pid


def test_accounts_list_shows_the_account_needs_qr(release: Release) -> None:
    c = release.container
    out = c.run("wadaemon", "accounts", "list").stdout
    assert re.search(rf"^{NEW_ACCOUNT}\s+needs qr\s", out, re.MULTILINE), out
    accounts = json.loads(c.run("wadaemon", "accounts", "list", "--json").stdout)
    mine = [a for a in accounts if a["account"] == NEW_ACCOUNT]
    assert mine and (mine[0].get("whatsapp") or {}).get("state") == "needs_qr", accounts


def test_stop_and_start_with_whatsapp_clients(release: Release) -> None:
    """Stopping ends the clients within 20 s; started again, the unpaired account waits for a
    pairing (needs qr) instead of connecting."""
    c = release.container
    mark = c.cursor()
    started = time.monotonic()
    c.run("systemctl", "stop", "wadaemon", timeout=60)
    seconds = time.monotonic() - started
    timed(release, "systemctl stop with WhatsApp clients", seconds)
    assert seconds < 20
    result = c.show("wadaemon", "Result", "ExecMainStatus", "ActiveState")
    assert result == {"Result": "success", "ExecMainStatus": "0", "ActiveState": "inactive"}, result
    index_of(daemon_entries(c, after=mark), "^stopped$")
    started = time.monotonic()
    c.run("systemctl", "start", "wadaemon", timeout=300)  # returns once READY=1 came
    timed(release, "systemctl start with WhatsApp clients (READY)", time.monotonic() - started)
    assert_active(c)

    def state() -> str | None:
        accounts = json.loads(c.run("wadaemon", "accounts", "list", "--json").stdout)
        found = [a for a in accounts if a["account"] == NEW_ACCOUNT]
        return (found[0].get("whatsapp") or {}).get("state") if found else None

    wait_for(lambda: state() == "needs_qr", 30, f"{NEW_ACCOUNT} to wait for a pairing again")


def test_journal_has_no_traceback(release: Release) -> None:
    c = release.container
    crashes = [m for m in c.messages("--unit=wadaemon") if CRASH.search(m)]
    assert not crashes, "\n".join(crashes)
    journal = c.run("journalctl", "--unit=wadaemon", "--no-pager").stdout
    assert "Traceback" not in journal, journal[-4000:]


def test_backup_then_restore_before_ready(release: Release) -> None:
    c = release.container
    make_session(c, "first")
    before = session_facts(c)
    assert before["integrity"] == "ok" and before["rows"] == 200
    started = time.monotonic()
    wait_for(lambda: head_creds_sha(c) == before["creds_sha256"], 30, f"a backup of {ACCOUNT}")
    timed(release, "first backup after the change", time.monotonic() - started)
    assert c.run("find", f"{BACKUPS}/{ACCOUNT}", "!", "-user", "wadaemon").stdout == ""

    mark = c.cursor()
    started = time.monotonic()
    c.run("systemctl", "stop", "wadaemon")
    timed(release, "systemctl stop", time.monotonic() - started)
    stopping = daemon_entries(c, after=mark)
    index_of(stopping, "stopped$", index_of(stopping, "^stopping: final backups"))

    c.run("rm", "-rf", f"{SESSIONS}/{ACCOUNT}")
    mark = c.cursor()
    started = time.monotonic()
    c.run("systemctl", "start", "wadaemon")  # returns once the daemon sent READY=1
    timed(release, "systemctl start with a restore", time.monotonic() - started)

    after = session_facts(c)
    assert after == before
    assert stat(c, f"{SESSIONS}/{ACCOUNT}") == "700 wadaemon wadaemon"
    assert c.run("find", f"{SESSIONS}/{ACCOUNT}", "!", "-user", "wadaemon").stdout == ""
    entries = daemon_entries(c, after=mark)
    restored = index_of(entries, rf"^restore: {ACCOUNT}: restored")
    ready = index_of(entries, r"^ready: ", restored)
    index_of(entries, r"Started wadaemon\.service", ready)

    # an admin's one-shot commands, run as root, leave every file to the daemon's user
    c.run("wadaemon", "backup", ACCOUNT)
    c.run("wadaemon", "verify", ACCOUNT)
    assert c.run("find", BACKUPS, SESSIONS, "!", "-user", "wadaemon").stdout == ""


GATEWAY_DROPIN = "/etc/systemd/system/wadaemon.service.d/50-gateway.conf"
GATEWAY_SESSION = f"{SESSIONS}/bob"
# The gateway's session as Baileys' multi-file auth state leaves it, written with umask 007.
WRITE_GATEWAY_SESSION = f"""umask 007
mkdir {GATEWAY_SESSION} {GATEWAY_SESSION}/keys
echo '{{"me": {{"id": "15551234567:1@s.whatsapp.net"}}}}' > {GATEWAY_SESSION}/creds.json
echo '{{"keyPair": 1}}' > {GATEWAY_SESSION}/keys/pre-key-1.json
"""


def owners(c: Container, path: str) -> str:
    return c.sh(f"cd {path} && find . -printf '%p %m %u %g\\n' | sort").stdout


def test_sidecar_gateway_in_the_daemons_group_gets_its_session_back(release: Release) -> None:
    """The README's sidecar set-up: a gateway running as its own user whose group is wadaemon,
    with umask 007. Its restored session keeps the group and the modes, so it can read and
    write it again (the owner is the daemon's: a hardened daemon cannot give files away). The
    sessions directory is made setgid here (2770), which the README does not need, to see that
    a bit the daemon may not set is reported rather than failing the restore."""
    c = release.container
    c.run("cp", "-p", CONFIG, "/root/wadaemon.yaml.sidecar")
    try:
        c.sh(f"sed -i '/^whatsapp:/,/^[a-z]/ s/^  enabled: .*/  enabled: false/' {CONFIG}")
        c.run("useradd", "--system", "--gid", "wadaemon", "--no-create-home", "gateway")
        c.write(GATEWAY_DROPIN, "[Service]\nStateDirectoryMode=0750\n")
        c.run("dpkg-statoverride", "--update", "--add", "wadaemon", "wadaemon", "2770", SESSIONS)
        c.run("systemctl", "daemon-reload")
        c.run("systemctl", "restart", "wadaemon")
        c.run("runuser", "-u", "gateway", "--", "sh", "-euc", WRITE_GATEWAY_SESSION)
        before = owners(c, GATEWAY_SESSION)
        assert "./creds.json 660 gateway wadaemon" in before, before
        wait_for(lambda: generations(c, "bob") is not None, 30, "a backup of bob")
        status = json.loads(c.run("wadaemon", "status", "--json").stdout)
        assert status["accounts"]["bob"]["state"] == "protected", status["accounts"]["bob"]

        c.run("systemctl", "stop", "wadaemon")
        c.run("rm", "-rf", GATEWAY_SESSION)
        mark = c.cursor()
        c.run("systemctl", "start", "wadaemon")
        index_of(daemon_entries(c, after=mark), r"^restore: bob: restored")
        after = owners(c, GATEWAY_SESSION)
        # the owner is the daemon's, and the setgid bit the sessions directory's statoverride
        # gave (2770) is dropped: the unit may not set it (RestrictSUIDSGID=), and says so
        expected = before.replace(" gateway ", " wadaemon ").replace(" 2770 ", " 770 ")
        assert after == expected, (before, after)
        index_of(daemon_entries(c, after=mark), r"could not set the setuid/setgid bits")
        c.run("runuser", "-u", "gateway", "--", "cat", f"{GATEWAY_SESSION}/creds.json")
        c.run(
            "runuser", "-u", "gateway", "--", "sh", "-c", f"echo '{{}}' > {GATEWAY_SESSION}/x.json"
        )
        c.run("wadaemon", "accounts", "remove", "bob", "--yes")
    finally:
        c.run("rm", "-rf", GATEWAY_SESSION, GATEWAY_DROPIN)
        c.run("dpkg-statoverride", "--remove", SESSIONS, check=False)
        c.run("chmod", "0700", SESSIONS)
        c.run("userdel", "gateway", check=False)
        c.run("cp", "-p", "/root/wadaemon.yaml.sidecar", CONFIG)
        c.run("systemctl", "daemon-reload")
        # this step starts the unit four times in a few seconds: without a reset, it and the
        # steps after it would run into systemd's start rate limit (5 starts in 10 s)
        c.run("systemctl", "reset-failed", "wadaemon", check=False)
        c.run("systemctl", "restart", "wadaemon")
        c.run("systemctl", "reset-failed", "wadaemon", check=False)


def test_reload(release: Release) -> None:
    c = release.container
    pid = c.show("wadaemon", "MainPID")["MainPID"]
    mark = c.cursor()
    started = time.monotonic()
    c.run("systemctl", "reload", "wadaemon", timeout=60)
    timed(release, "systemctl reload", time.monotonic() - started)
    # systemd logs "Reloaded" on the daemon's READY=1, a datagram; the daemon's own lines come
    # through its output stream and may reach the journal a moment later
    c.wait_journal(
        lambda m: m.startswith("reload: done"), 10, "reload: done", "--unit=wadaemon", after=mark
    )
    entries = daemon_entries(c, after=mark)
    index_of(entries, r"^reload: done", index_of(entries, "^reloading the configuration"))
    assert_active(c)
    assert c.show("wadaemon", "MainPID")["MainPID"] == pid
    # a broken file is reported (priority err) and the running configuration kept
    c.run("cp", "-p", CONFIG, "/root/wadaemon.yaml.orig")
    c.sh(f"echo 'no_such_key: 1' >> {CONFIG}")
    mark = c.cursor()
    c.run("systemctl", "reload", "wadaemon", timeout=60)
    c.wait_journal(
        lambda m: "keeping the running" in m, 10, "the error", "--unit=wadaemon", after=mark
    )
    entries = [e for e in daemon_entries(c, after=mark) if "keeping the running" in message(e)]
    assert entries and entries[0]["PRIORITY"] == "3", entries
    assert_active(c)
    assert c.show("wadaemon", "MainPID")["MainPID"] == pid
    c.run("cp", "-p", "/root/wadaemon.yaml.orig", CONFIG)
    c.run("systemctl", "reload", "wadaemon", timeout=60)


def test_watchdog_restarts_a_stuck_daemon(release: Release) -> None:
    c = release.container
    c.write(TEST_DROPIN, "[Service]\nEnvironment=WADAEMON_FAULTS=1\nWatchdogSec=3\nRestartSec=1\n")
    c.run("systemctl", "daemon-reload")
    c.run("systemctl", "restart", "wadaemon")
    before = c.show("wadaemon", "MainPID", "NRestarts")
    assert before["NRestarts"] == "0"
    mark = c.cursor()
    code, body = curl(c, "/debug/hang/loop?seconds=60", method="POST")
    assert code == 200, body
    started = time.monotonic()
    c.wait_journal(
        lambda m: "Watchdog timeout" in m,
        20,
        "systemd's watchdog timeout",
        "--unit=wadaemon",
        after=mark,
    )
    timed(release, "hang -> watchdog timeout", time.monotonic() - started)

    def restarted() -> bool:
        now = c.show("wadaemon", "MainPID", "NRestarts", "ActiveState")
        return (
            now["ActiveState"] == "active"
            and now["NRestarts"] == "1"
            and now["MainPID"] != before["MainPID"]
        )

    wait_for(restarted, 60, "wadaemon to be restarted after the watchdog timeout")
    timed(release, "hang -> active again", time.monotonic() - started)
    said = c.messages("--unit=wadaemon", after=mark)
    assert any("Failed with result 'watchdog'" in m for m in said), said
    c.run("rm", TEST_DROPIN)
    c.run("systemctl", "daemon-reload")
    c.run("systemctl", "restart", "wadaemon")


def test_firestore_credential_is_optional(release: Release) -> None:
    c = release.container
    c.sh(
        "install -d -m 0700 /etc/credstore && "
        'echo \'{"type": "service_account"}\' > /etc/credstore/firestore-credentials && '
        "chmod 0600 /etc/credstore/firestore-credentials"
    )
    c.run("systemctl", "restart", "wadaemon")
    assert_active(c)
    c.run("test", "-f", "/run/credentials/wadaemon.service/firestore-credentials")
    c.run("rm", "/etc/credstore/firestore-credentials")
    c.run("systemctl", "restart", "wadaemon")
    assert_active(c)
    c.run("test", "!", "-e", "/run/credentials/wadaemon.service/firestore-credentials")


def test_upgrade_makes_a_final_backup_and_restarts(release: Release) -> None:
    c = release.container
    # a version above the installed one, from the same files
    c.sh(
        f"rm -rf /tmp/up && dpkg-deb -R {release.deb_inside} /tmp/up && "
        "sed -i 's/^Version: .*/&.1/' /tmp/up/DEBIAN/control && "
        "dpkg-deb -Znone -b /tmp/up /tmp/wadaemon-upgrade.deb >/dev/null"
    )
    # a long debounce, so the change below can only be saved by the final backup at stop; the
    # startup pass of the daemon the step before started must be over, or it could take it
    wait_for(lambda: backups_settled(c), 60, "the daemon's startup backups")
    c.run("cp", "-p", CONFIG, "/root/wadaemon.yaml.orig")
    c.sh(f"sed -i 's/^  debounce_seconds: .*/  debounce_seconds: 60/' {CONFIG}")
    mark = c.cursor()  # from the reload on: a failure shows what the daemon did meanwhile
    c.run("systemctl", "reload", "wadaemon", timeout=60)
    make_session(c, "changed before the upgrade")
    changed = session_facts(c)
    key = c.run("sha256sum", KEY).stdout
    old = c.show("wadaemon", "MainPID")["MainPID"]
    started = time.monotonic()
    r = c.run("apt-get", "install", "--yes", "/tmp/wadaemon-upgrade.deb", timeout=300)
    timed(release, "apt upgrade (stop, unpack, start)", time.monotonic() - started)
    assert "created the encryption key" not in r.stdout
    assert_active(c)
    assert c.show("wadaemon", "MainPID")["MainPID"] != old
    entries = daemon_entries(c, after=mark)
    stopping = index_of(entries, "^stopping: final backups")
    saved = index_of(entries, rf"^backup: {ACCOUNT}\b", stopping)
    stopped = index_of(entries, "^stopped$", saved)
    assert all(entries[i].get("_PID") == old for i in (stopping, saved, stopped))
    index_of(entries, "^ready: ", index_of(entries, "^wadaemon .* starting", stopped))
    assert head_creds_sha(c) == changed["creds_sha256"]
    assert c.run("sha256sum", KEY).stdout == key
    assert c.run("dpkg-query", "-W", "-f=${Version}", "wadaemon").stdout.endswith(".1")
    c.run("cp", "-p", "/root/wadaemon.yaml.orig", CONFIG)
    c.run("systemctl", "reload", "wadaemon", timeout=60)


def test_remove_keeps_sessions_backups_and_key(release: Release) -> None:
    c = release.container
    facts = session_facts(c)
    key = c.run("sha256sum", KEY).stdout
    r = c.run("apt-get", "remove", "--yes", "wadaemon", timeout=300)
    assert "Kept: the sessions" in r.stdout, r.stdout
    assert active(c) in ("inactive", "unknown")
    c.run("test", "!", "-e", "/usr/bin/wadaemon")
    assert session_facts(c) == facts
    c.run("test", "-f", f"{BACKUPS}/{ACCOUNT}/HEAD.json")
    assert c.run("sha256sum", KEY).stdout == key
    c.run("test", "-f", CONFIG)
    c.run("getent", "passwd", "wadaemon")


def test_purge_keeps_data_and_reinstall_picks_it_up(release: Release) -> None:
    c = release.container
    facts = session_facts(c)
    key = c.run("sha256sum", KEY).stdout
    r = c.run("apt-get", "purge", "--yes", "wadaemon", timeout=300)
    assert "NOT deleted" in r.stdout, r.stdout
    c.run("test", "!", "-e", CONFIG)
    assert c.run("getent", "passwd", "wadaemon", check=False).returncode == 2
    # the group stays while someone is in it (operator, added by an earlier step)
    assert c.run("getent", "group", "wadaemon").stdout.strip().endswith(":operator")
    assert "kept the group wadaemon: it still has members (operator)" in r.stdout
    # kept, and handed to root so that no later user inherits them
    assert stat(c, f"{SESSIONS}/{ACCOUNT}") == "700 root root"
    assert stat(c, f"{BACKUPS}/{ACCOUNT}") == "700 root root"
    assert c.run("sha256sum", KEY).stdout == key

    r = c.run("apt-get", "install", "--yes", release.deb_inside, timeout=300)
    assert "created the encryption key" not in r.stdout  # the kept key is used again
    wait_active(c)
    assert c.run("sha256sum", KEY).stdout == key
    assert c.run("find", SESSIONS, BACKUPS, "!", "-user", "wadaemon").stdout == ""
    assert session_facts(c) == facts
    code, body = curl(c, "/accounts")
    assert code == 200 and ACCOUNT in [a["account"] for a in json.loads(body)["accounts"]]


def test_previous_package_over_the_kept_data(release: Release) -> None:
    """The per-release package of the version before (0.1.0-1+deb12 or +deb13, its virtualenv
    owned by dpkg), as a server runs it before this upgrade: installed over the kept data, the
    configuration edited by the admin, a session changed and backed up."""
    c = release.container
    c.run("apt-get", "remove", "--yes", "wadaemon", timeout=300)
    c.run("test", "!", "-e", "/opt/venvs/wadaemon")  # remove takes the virtualenv with it
    r = c.run(
        "apt-get",
        "install",
        "--yes",
        "--no-install-recommends",
        release.previous_inside,
        timeout=300,
    )
    assert "created the encryption key" not in r.stdout  # the kept key
    wait_active(c)
    version = c.run("dpkg-query", "-W", "-f=${Version}", "wadaemon").stdout
    assert "+deb" in version, version
    c.run("dpkg", "-S", VENV_PYTHON)  # that package's virtualenv is dpkg's
    c.sh(f"echo '# changed by the admin' >> {CONFIG}")
    c.run("systemctl", "reload", "wadaemon", timeout=60)
    make_session(c, f"changed under {version}")
    changed = session_facts(c)
    wait_for(lambda: head_creds_sha(c) == changed["creds_sha256"], 30, f"a backup by {version}")
    release.facts["upgraded from"] = Path(release.previous_inside).name


def test_upgrade_from_the_previous_package_keeps_everything(release: Release) -> None:
    """`apt install ./wadaemon_<new>.deb` over the per-release package: sessions, backups (every
    generation), key, the edited configuration, the unit and its drop-in all stay; the new
    package's virtualenv replaces dpkg's; the new daemon restores a lost session from them."""
    c = release.container
    facts = session_facts(c)
    key = c.run("sha256sum", KEY).stdout
    config = c.run("sha256sum", CONFIG).stdout
    doc = generations(c)
    assert doc is not None
    kept = [g["generation"] for g in doc["generations"]]
    old = c.show("wadaemon", "MainPID")["MainPID"]
    started = time.monotonic()
    r = c.run("apt-get", "install", "--yes", release.deb_inside, timeout=300)
    timed(release, "apt upgrade from the previous package", time.monotonic() - started)
    out = r.stdout + r.stderr
    assert "created the encryption key" not in out
    assert "built /opt/venvs/wadaemon for /usr/bin/python3." in out, out
    warnings = [line for line in out.splitlines() if "warning" in line.lower()]
    release.facts["dpkg warnings during that upgrade"] = "; ".join(warnings) or "none"
    assert_active(c)
    assert c.show("wadaemon", "MainPID")["MainPID"] != old
    new_version = c.run("dpkg-deb", "-f", release.deb_inside, "Version").stdout.strip()
    assert c.run("dpkg-query", "-W", "-f=${Version}", "wadaemon").stdout == new_version
    # the unit and its drop-in moved from the old package's files to the new one's (on Debian
    # 12 from /lib/systemd/system, the same directory on a merged-/usr system): still there
    shown = c.show("wadaemon", "FragmentPath", "DropInPaths", "Environment")
    # (Debian 12's systemd finds it through /lib first: the same file)
    fragment = c.run("readlink", "-f", shown["FragmentPath"]).stdout.strip()
    assert fragment == "/usr/lib/systemd/system/wadaemon.service", shown
    c.run("test", "-f", "/usr/lib/systemd/system/wadaemon.service.d/10-sessions.conf")
    assert "10-sessions.conf" in shown["DropInPaths"], shown
    assert f"SESSIONS_PATH={SESSIONS}" in shown["Environment"], shown
    assert c.run("systemctl", "is-enabled", "wadaemon").stdout.strip() == "enabled"
    # data, key and the admin's configuration
    assert session_facts(c) == facts
    assert c.run("sha256sum", KEY).stdout == key
    assert c.run("sha256sum", CONFIG).stdout == config
    doc = generations(c)
    assert doc is not None and set(kept) <= {g["generation"] for g in doc["generations"]}
    # the virtualenv is the new package's, built by postinst, no longer dpkg's
    assert c.run("dpkg", "-S", VENV_PYTHON, check=False).returncode == 1
    c.run(INSTALL_VENV, "--check")
    c.run("dpkg", "--verify", "wadaemon")
    # a session lost after the upgrade comes back from the backups
    c.run("systemctl", "stop", "wadaemon")
    c.run("rm", "-rf", f"{SESSIONS}/{ACCOUNT}")
    mark = c.cursor()
    c.run("systemctl", "start", "wadaemon")
    assert session_facts(c) == facts
    index_of(daemon_entries(c, after=mark), rf"^restore: {ACCOUNT}: restored")


def test_python3_change_rebuilds_the_virtualenv(release: Release) -> None:
    """The dpkg trigger on the python3 interpreters (a release upgrade moves python3 to another
    minor version): postinst finds a virtualenv that does not fit python3, stops the daemon,
    builds it again from the carried wheels and starts the daemon. Without a virtualenv,
    /usr/bin/wadaemon says how to rebuild it and exits 78."""
    c = release.container
    facts = session_facts(c)
    stamp = c.read("/opt/venvs/wadaemon/wadaemon-venv.txt")
    old = c.show("wadaemon", "MainPID")["MainPID"]
    # a virtualenv left from another Python, as after python3 moved from 3.11 to 3.13
    c.sh("echo 'python=/usr/bin/python3.9 requirements=0' >/opt/venvs/wadaemon/wadaemon-venv.txt")
    assert c.run(INSTALL_VENV, "--check", check=False).returncode == 1
    c.run("dpkg-trigger", "--by-package=python3-minimal", "--no-await", "/usr/bin/python3")
    r = c.run("dpkg", "--triggers-only", "--pending", timeout=300)
    assert "python3 changed; building the virtualenv again" in r.stdout, r.stdout + r.stderr
    assert_active(c)
    assert c.show("wadaemon", "MainPID")["MainPID"] != old
    assert c.read("/opt/venvs/wadaemon/wadaemon-venv.txt") == stamp
    assert session_facts(c) == facts
    # a trigger while the virtualenv fits changes nothing
    pid = c.show("wadaemon", "MainPID")["MainPID"]
    c.run("dpkg-trigger", "--by-package=python3-minimal", "--no-await", "/usr/bin/python3")
    r = c.run("dpkg", "--triggers-only", "--pending", timeout=300)
    assert "building the virtualenv again" not in r.stdout
    assert c.show("wadaemon", "MainPID")["MainPID"] == pid

    c.run("systemctl", "stop", "wadaemon")
    c.run("mv", "/opt/venvs/wadaemon", "/opt/venvs/wadaemon.away")
    r = c.run("wadaemon", "--version", check=False)
    assert r.returncode == 78 and "sudo /usr/lib/wadaemon/install-venv" in r.stderr, r.stderr
    c.run("mv", "/opt/venvs/wadaemon.away", "/opt/venvs/wadaemon")
    c.run("systemctl", "start", "wadaemon")
    assert_active(c)
