"""Configuration: the documented defaults, path resolution, and one clear message per mistake."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from wadaemon.config import (
    DEFAULT_CONFIG_PATH,
    SCHEMA,
    Config,
    config_path_from,
    load_config,
    parse_config,
)
from wadaemon.errors import EXIT_CONFIG, ConfigError
from wadaemon.keyring import write_new_key

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "etc" / "wadaemon" / "wadaemon.yaml"

# Variables that would change what the CLI reads; the subprocesses run without them.
_ISOLATE = (
    "WADAEMON_CONFIG",
    "SESSIONS_PATH",
    "CREDENTIALS_DIRECTORY",
    "JOURNAL_STREAM",
    "GOOGLE_CLOUD_PROJECT",
    "GOOGLE_APPLICATION_CREDENTIALS",
    "FIRESTORE_EMULATOR_HOST",
)


def clean_environ(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _ISOLATE}
    env.update(extra)
    return env


def wadaemon(*args: str, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "wadaemon", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(env) if env is not None else clean_environ(),
        cwd=REPO,
    )


def assert_defaults(config: Config) -> None:
    assert config.sessions_path == Path("/var/lib/wadaemon/sessions")
    assert config.socket_path == Path("/run/wadaemon/wadaemon.sock")
    assert config.log_level == "info"
    assert config.encryption.key_file == Path("/etc/wadaemon/session.key")
    assert config.encryption.old_key_files == ()
    assert config.backup.target == "directory"
    assert config.backup.directory == Path("/var/backups/wadaemon")
    assert config.backup.debounce_seconds == 1.0
    assert config.backup.interval_seconds == 300.0
    assert config.backup.keep_generations == 5
    assert config.restore.on_boot is True
    assert config.restore.timeout_seconds == 120.0
    assert config.restore.parallelism == 8
    assert config.whatsapp.enabled is True


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


# --- defaults -------------------------------------------------------------------------------


def test_shipped_example_yields_the_documented_defaults() -> None:
    config = load_config(EXAMPLE, environ={})
    assert config.path == EXAMPLE
    assert_defaults(config)


def test_shipped_example_lists_every_key_with_its_default_value() -> None:
    example = flatten(yaml.safe_load(EXAMPLE.read_text(encoding="utf-8")))
    defaults = {key: spec[1] for key, spec in flatten(SCHEMA).items()}
    assert example == defaults


@pytest.mark.parametrize("text", ["", "# only a comment\n\n", "---\n"])
def test_empty_file_gives_the_same_configuration_as_the_example(tmp_path: Path, text: str) -> None:
    path = tmp_path / "wadaemon.yaml"
    path.write_text(text)
    config = load_config(path, environ={})
    assert_defaults(config)
    assert config == dataclasses.replace(load_config(EXAMPLE, environ={}), path=path)


def test_configuration_is_frozen(tmp_path: Path) -> None:
    config = parse_config("", tmp_path / "w.yaml", {})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.sessions_path = Path("/elsewhere")  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.backup.keep_generations = 1  # type: ignore[misc]


# --- paths and the environment ----------------------------------------------------------------

RELATIVE = """\
sessions_path: sessions
socket_path: run/wadaemon.sock
encryption:
  key_file: keys/session.key
  old_key_files: [keys/old.key, /abs/older.key]
backup:
  directory: ../backups
"""


def test_relative_paths_resolve_against_the_directory_of_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    path = etc / "wadaemon.yaml"
    path.write_text(RELATIVE)
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the working directory must not matter

    config = load_config(path, environ={})

    assert config.sessions_path == etc / "sessions"
    assert config.socket_path == etc / "run" / "wadaemon.sock"
    assert config.encryption.key_file == etc / "keys" / "session.key"
    assert config.encryption.old_key_files == (etc / "keys" / "old.key", Path("/abs/older.key"))
    assert config.backup.directory.is_absolute()
    assert Path(os.path.normpath(config.backup.directory)) == tmp_path / "backups"


def test_a_relative_config_path_still_yields_absolute_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "wadaemon.yaml").write_text(RELATIVE)
    monkeypatch.chdir(tmp_path)
    config = load_config(Path("etc/wadaemon.yaml"), environ={})
    assert config.sessions_path == tmp_path / "etc" / "sessions"
    assert config.encryption.key_file == tmp_path / "etc" / "keys" / "session.key"
    # a file in the working directory itself (parent is ".")
    Path("w.yaml").write_text("sessions_path: here\n")
    assert load_config(Path("w.yaml"), environ={}).sessions_path == tmp_path / "here"


def test_sessions_path_environment_variable_overrides_the_file(tmp_path: Path) -> None:
    path = tmp_path / "wadaemon.yaml"
    path.write_text(f"sessions_path: {tmp_path / 'from-file'}\n")
    override = tmp_path / "from-env"
    config = load_config(path, environ={"SESSIONS_PATH": str(override)})
    assert config.sessions_path == override
    assert load_config(path, environ={}).sessions_path == tmp_path / "from-file"


def test_sessions_path_from_os_environ_when_no_environ_is_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "wadaemon.yaml"
    path.write_text("")
    monkeypatch.setenv("SESSIONS_PATH", str(tmp_path / "from-env"))
    assert load_config(path).sessions_path == tmp_path / "from-env"


def test_relative_sessions_path_environment_variable_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "wadaemon.yaml"
    path.write_text("")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={"SESSIONS_PATH": "relative/sessions"})
    message = str(info.value)
    assert "$SESSIONS_PATH" in message
    assert "'relative/sessions'" in message
    assert "absolute" in message
    assert info.value.exit_code == EXIT_CONFIG == 78


def test_sessions_path_from_environment_is_checked_against_the_backup_directory(
    tmp_path: Path,
) -> None:
    backups = tmp_path / "backups"
    text = f"sessions_path: {tmp_path / 'sessions'}\nbackup:\n  directory: {backups}\n"
    with pytest.raises(ConfigError, match="overlaps"):
        parse_config(text, tmp_path / "w.yaml", {"SESSIONS_PATH": str(backups / "sessions")})


def test_config_path_precedence() -> None:
    env = {"WADAEMON_CONFIG": "/from/env.yaml"}
    assert config_path_from("/from/cli.yaml", env) == Path("/from/cli.yaml")
    assert config_path_from(None, env) == Path("/from/env.yaml")
    assert config_path_from(None, {}) == DEFAULT_CONFIG_PATH == Path("/etc/wadaemon/wadaemon.yaml")
    assert config_path_from(None, {"WADAEMON_CONFIG": ""}) == DEFAULT_CONFIG_PATH


def test_config_path_uses_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WADAEMON_CONFIG", "/from/os-env.yaml")
    assert config_path_from(None) == Path("/from/os-env.yaml")
    assert config_path_from("/cli.yaml") == Path("/cli.yaml")


# --- bad configurations through the real CLI --------------------------------------------------

GOOD = """\
sessions_path: {root}/sessions
socket_path: {root}/wadaemon.sock
encryption:
  key_file: {root}/session.key
backup:
  target: directory
  directory: {root}/backups
  debounce_seconds: 0.5
  keep_generations: 3
restore:
  on_boot: true
"""

HEAD = GOOD.split("backup:")[0]


def with_line(old: str, new: str) -> str:
    assert GOOD.count(old) == 1, old
    return GOOD.replace(old, new)


def chmod(mode: int) -> Callable[[Path], None]:
    def prepare(root: Path) -> None:
        (root / "session.key").chmod(mode)

    return prepare


def key_text(text: str) -> Callable[[Path], None]:
    def prepare(root: Path) -> None:
        (root / "session.key").write_text(text)

    return prepare


def remove_key(root: Path) -> None:
    (root / "session.key").unlink()


FIRESTORE = "firestore:\n  project: {project}\n"
SERVICE_ACCOUNT = '{"type": "service_account", "project_id": "my-project"}\n'


def service_account(mode: int, text: str = SERVICE_ACCOUNT) -> Callable[[Path], None]:
    def prepare(root: Path) -> None:
        path = root / "service-account.json"
        path.write_text(text)
        path.chmod(mode)

    return prepare


@dataclass(frozen=True)
class Bad:
    name: str
    text: str | None  # None: no configuration file at all
    names: str  # the file the message must name
    key: str | None  # the dotted key the message must name
    line: str | None  # the line (as written) holding that key; its number must be named
    hints: tuple[str, ...]  # the fix
    prepare: Callable[[Path], None] | None = None


CASES = [
    Bad(
        "messages-among-the-sessions",
        GOOD + "messages:\n  path: {root}/sessions/messages\n",
        "{config}",
        "messages.path",
        "  path: {root}/sessions/messages",
        ("overlaps sessions_path", "beside the sessions, not among them"),
    ),
    Bad(
        "webhook-not-a-url",
        GOOD + "messages:\n  webhook:\n    url: ftp://crm.example\n",
        "{config}",
        "messages.webhook.url",
        "    url: ftp://crm.example",
        ("is not an http:// or https:// URL",),
    ),
    Bad(
        "webhook-without-a-key",
        GOOD + "messages:\n  webhook:\n    url: https://crm.example/hook\n",
        "{config}",
        "messages.webhook.url",
        "    url: https://crm.example/hook",
        ("needs messages.webhook.secret_file", "head -c 32 /dev/urandom"),
    ),
    Bad(
        "instance-id-with-a-space",
        GOOD + "instance:\n  id: web 1\n",
        "{config}",
        "instance.id",
        "  id: web 1",
        ("is not an instance id", "different one on every host"),
    ),
    Bad(
        "lease-renewed-too-rarely",
        GOOD + "leases:\n  ttl_seconds: 30\n  renew_seconds: 20\n",
        "{config}",
        "leases.renew_seconds",
        "  renew_seconds: 20",
        ("more than half of leases.ttl_seconds", "renew at most every ttl/2"),
    ),
    Bad(
        "negative-max-accounts",
        GOOD + "instance:\n  max_accounts: -1\n",
        "{config}",
        "instance.max_accounts",
        "  max_accounts: -1",
        ("a whole number of at least 0",),
    ),
    Bad(
        "unknown-top-level-key",
        GOOD + "sesions_path: {root}/other\n",
        "{config}",
        "sesions_path",
        "sesions_path: {root}/other",
        ("unknown key", "did you mean 'sessions_path'?"),
    ),
    Bad(
        "unknown-nested-key-close-match",
        GOOD + "  paralellism: 2\n",
        "{config}",
        "restore.paralellism",
        "  paralellism: 2",
        ("unknown key", "did you mean 'parallelism'?"),
    ),
    Bad(
        "unknown-nested-key-no-match",
        with_line("  keep_generations: 3", "  keep_generations: 3\n  compression: gzip"),
        "{config}",
        "backup.compression",
        "  compression: gzip",
        ("unknown key", "known keys: target, directory, debounce_seconds"),
    ),
    Bad(
        "debounce-is-a-string",
        with_line("debounce_seconds: 0.5", "debounce_seconds: soon"),
        "{config}",
        "backup.debounce_seconds",
        "  debounce_seconds: soon",
        ("must be a number of seconds", "'soon'"),
    ),
    Bad(
        "on-boot-is-the-string-yes",
        with_line("on_boot: true", 'on_boot: "yes"'),
        "{config}",
        "restore.on_boot",
        '  on_boot: "yes"',
        ("must be true or false", "'yes'"),
    ),
    Bad(
        "keep-generations-zero",
        with_line("keep_generations: 3", "keep_generations: 0"),
        "{config}",
        "backup.keep_generations",
        "  keep_generations: 0",
        ("a whole number of at least 1", "got int 0"),
    ),
    Bad(
        "backup-is-a-list",
        HEAD + "backup: [directory, /srv/backups]\n",
        "{config}",
        "backup",
        "backup: [directory, /srv/backups]",
        ("must be a mapping with the keys target, directory",),
    ),
    Bad(
        "invalid-target",
        with_line("target: directory", "target: s3"),
        "{config}",
        "backup.target",
        "  target: s3",
        ("must be one of directory", "none", "'s3'"),
    ),
    Bad(
        "duplicated-key",
        GOOD + "  on_boot: false\n",
        "{config}",
        "restore.on_boot",
        "  on_boot: false",
        ("appears twice", "keep only one"),
    ),
    Bad(
        "duplicated-top-level-key",
        GOOD + "sessions_path: {root}/again\n",
        "{config}",
        "sessions_path",
        "sessions_path: {root}/again",
        ("appears twice", "keep only one"),
    ),
    Bad(
        "backup-directory-inside-sessions",
        with_line("directory: {root}/backups", "directory: {root}/sessions/backups"),
        "{config}",
        "backup.directory",
        "  directory: {root}/sessions/backups",
        ("overlaps sessions_path", "outside the sessions directory"),
    ),
    Bad(
        "sessions-inside-backup-directory",
        with_line("directory: {root}/backups", "directory: {root}"),
        "{config}",
        "backup.directory",
        "  directory: {root}",
        ("overlaps sessions_path", "outside the sessions directory"),
    ),
    Bad(
        "firestore-without-project",
        with_line("target: directory", "target: firestore"),
        "{config}",
        "firestore.project",
        None,  # not in the file
        ("no project is set", "set firestore.project", "$GOOGLE_CLOUD_PROJECT"),
    ),
    Bad(
        "firestore-project-is-a-display-name",
        with_line("target: directory", "target: firestore") + FIRESTORE.format(project="My App"),
        "{config}",
        "firestore.project",
        "  project: My App",
        ("'My App' is not a Google Cloud project id", "gcloud projects list"),
    ),
    Bad(
        "firestore-prefix-with-a-slash",
        with_line("target: directory", "target: firestore")
        + FIRESTORE.format(project="my-project")
        + "  collection_prefix: staging/x\n",
        "{config}",
        "firestore.collection_prefix",
        "  collection_prefix: staging/x",
        ("cannot start a collection name", "letters, digits"),
    ),
    Bad(
        "firestore-credentials-file-missing",
        with_line("target: directory", "target: firestore")
        + FIRESTORE.format(project="my-project")
        + "  credentials_file: {root}/service-account.json\n",
        "{root}/service-account.json",
        "firestore.credentials_file",
        "  credentials_file: {root}/service-account.json",
        ("not found", "roles/datastore.user", "chmod 600"),
    ),
    Bad(
        "firestore-credentials-file-mode-0644",
        with_line("target: directory", "target: firestore")
        + FIRESTORE.format(project="my-project")
        + "  credentials_file: {root}/service-account.json\n",
        "{root}/service-account.json",
        "firestore.credentials_file",
        "  credentials_file: {root}/service-account.json",
        ("mode 0644", "chmod 600 {root}/service-account.json"),
        service_account(0o644),
    ),
    Bad(
        "firestore-credentials-file-not-json",
        with_line("target: directory", "target: firestore")
        + FIRESTORE.format(project="my-project")
        + "  credentials_file: {root}/service-account.json\n",
        "{root}/service-account.json",
        "firestore.credentials_file",
        "  credentials_file: {root}/service-account.json",
        ("not a Google credentials JSON file", "roles/datastore.user"),
        service_account(0o600, "project = my-project\n"),
    ),
    Bad(
        "top-level-is-a-list",
        "- sessions_path: /srv\n- backup: none\n",
        "{config}",
        None,
        None,
        ("must be a YAML mapping", "etc/wadaemon/wadaemon.yaml"),
    ),
    Bad(
        "top-level-is-a-string",
        "sessions_path /srv/sessions\n",
        "{config}",
        None,
        None,
        ("must be a YAML mapping",),
    ),
    Bad(
        "missing-config-file",
        None,
        "{config}",
        None,
        None,
        ("configuration file not found", "--config", "$WADAEMON_CONFIG"),
    ),
    Bad(
        "key-file-missing",
        GOOD,
        "{root}/session.key",
        "encryption.key_file",
        "  key_file: {root}/session.key",
        ("not found", "wadaemon keygen {root}/session.key"),
        remove_key,
    ),
    Bad(
        "key-file-mode-0644",
        GOOD,
        "{root}/session.key",
        "encryption.key_file",
        "  key_file: {root}/session.key",
        ("mode 0644", "chmod 600 {root}/session.key"),
        chmod(0o644),
    ),
    Bad(
        "key-file-mode-0640",
        GOOD,
        "{root}/session.key",
        "encryption.key_file",
        "  key_file: {root}/session.key",
        ("mode 0640", "chmod 600"),
        chmod(0o640),
    ),
    Bad(
        "key-file-too-short",
        GOOD,
        "{root}/session.key",
        "encryption.key_file",
        "  key_file: {root}/session.key",
        ("exactly 64 hexadecimal characters", "found 62 characters", "wadaemon keygen"),
        key_text("ab" * 31 + "\n"),
    ),
    Bad(
        "key-file-too-long",
        GOOD,
        "{root}/session.key",
        "encryption.key_file",
        "  key_file: {root}/session.key",
        ("exactly 64 hexadecimal characters", "found 66 characters", "wadaemon keygen"),
        key_text("0x" + "ab" * 32 + "\n"),
    ),
    Bad(
        "key-file-not-hex",
        GOOD,
        "{root}/session.key",
        "encryption.key_file",
        "  key_file: {root}/session.key",
        ("not hexadecimal", "0-9 and a-f", "wadaemon keygen"),
        key_text("g" + "a" * 63 + "\n"),
    ),
    Bad(
        "old-key-file-missing",
        with_line(
            "  key_file: {root}/session.key",
            "  key_file: {root}/session.key\n  old_key_files: [{root}/old.key]",
        ),
        "{root}/old.key",
        "encryption.old_key_files",
        "  old_key_files: [{root}/old.key]",
        ("not found", "the copy you kept"),
    ),
]


def line_number(text: str, line: str) -> int:
    numbers = [i for i, candidate in enumerate(text.splitlines(), 1) if candidate == line]
    assert len(numbers) == 1, (line, text)
    return numbers[0]


def setup_case(case: Bad, root: Path) -> Path:
    """Write a valid key, the case's configuration and its damage; return the config path."""
    config = root / "wadaemon.yaml"
    write_new_key(root / "session.key")
    if case.text is not None:
        config.write_text(case.text.format(root=root))
    if case.prepare is not None:
        case.prepare(root)
    return config


def assert_one_message(
    proc: subprocess.CompletedProcess[str], case: Bad, root: Path, config: Path
) -> str:
    assert proc.returncode == EXIT_CONFIG == 78, proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    message = lines[0]
    named = case.names.format(root=root, config=config)
    assert named in message
    if case.key is not None:
        assert case.key in message
    if case.line is not None:
        assert case.text is not None
        text = case.text.format(root=root)
        number = line_number(text, case.line.format(root=root))
        assert re.search(re.escape(f"{config}:{number}: ") + re.escape(case.key or ""), message), (
            f"line {number} not named: {message}"
        )
    for hint in case.hints:
        assert hint.format(root=root) in message
    return message


RUN_CASES = [
    c
    for c in CASES
    if c.name
    in {"unknown-top-level-key", "debounce-is-a-string", "key-file-missing", "key-file-mode-0644"}
]


@dataclass(frozen=True)
class Outcome:
    root: Path
    config: Path
    proc: subprocess.CompletedProcess[str]


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Outcome]:
    """Every bad case through the CLI, run side by side to keep the suite fast.

    Each (case, command) pair gets its own directory, so the runs cannot affect one another.
    """
    jobs = [(c, "check-config") for c in CASES] + [(c, "run") for c in RUN_CASES]
    setups: dict[tuple[str, str], tuple[Path, Path]] = {}
    for case, command in jobs:
        root = tmp_path_factory.mktemp(f"{case.name}-{command}")
        setups[case.name, command] = (root, setup_case(case, root))
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1)) as pool:
        futures = {
            job: pool.submit(wadaemon, job[1], "--config", str(config))
            for job, (_, config) in setups.items()
        }
        return {
            job: Outcome(setups[job][0], setups[job][1], future.result())
            for job, future in futures.items()
        }


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_check_config_reports_one_clear_message(
    case: Bad, outcomes: dict[tuple[str, str], Outcome]
) -> None:
    out = outcomes[case.name, "check-config"]
    message = assert_one_message(out.proc, case, out.root, out.config)
    assert message.startswith("wadaemon check-config: ")


@pytest.mark.parametrize("case", RUN_CASES, ids=[c.name for c in RUN_CASES])
def test_run_refuses_a_bad_configuration_with_exit_78(
    case: Bad, outcomes: dict[tuple[str, str], Outcome]
) -> None:
    out = outcomes[case.name, "run"]
    message = assert_one_message(out.proc, case, out.root, out.config)
    assert "cannot continue" in message
    # nothing was started or created before the configuration was refused
    assert not (out.root / "sessions").exists()
    assert not (out.root / "backups").exists()
    assert not (out.root / "wadaemon.sock").exists()


def test_invalid_yaml_names_line_and_column(tmp_path: Path) -> None:
    config = tmp_path / "wadaemon.yaml"
    text = GOOD.format(root=tmp_path) + "log_level: debug: info\n"
    config.write_text(text)
    write_new_key(tmp_path / "session.key")
    number = len(text.splitlines())
    column = "log_level: debug: info".index(":", len("log_level:")) + 1
    for command in ("check-config", "run"):
        proc = wadaemon(command, "--config", str(config))
        assert proc.returncode == 78, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1, proc.stderr
        assert f"{config}:{number}:{column}: not valid YAML" in lines[0]
        assert "fix the syntax" in lines[0]


def test_valid_configuration_passes_check_config(tmp_path: Path) -> None:
    """The base of every bad case above is valid, so each failure is the one it names."""
    config = tmp_path / "wadaemon.yaml"
    config.write_text(GOOD.format(root=tmp_path))
    key = write_new_key(tmp_path / "session.key")
    (tmp_path / "backups").mkdir()  # as the package does; absent, it is a warning
    proc = wadaemon("check-config", "--config", str(config))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert proc.stdout.startswith(f"{config}: ok\n")
    assert key.key_id in proc.stdout
    assert f"directory {tmp_path / 'backups'}" in proc.stdout


def test_check_config_follows_environment(tmp_path: Path) -> None:
    """No --config: $WADAEMON_CONFIG names the file, and $SESSIONS_PATH overrides it."""
    config = tmp_path / "wadaemon.yaml"
    config.write_text(GOOD.format(root=tmp_path))
    write_new_key(tmp_path / "session.key")
    override = tmp_path / "env-sessions"
    env = clean_environ(WADAEMON_CONFIG=str(config), SESSIONS_PATH=str(override))
    proc = wadaemon("check-config", env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"{config}: ok\n")
    assert re.search(r"sessions_path\s+" + re.escape(str(override)) + "\n", proc.stdout)


def test_target_none_needs_no_key_file(tmp_path: Path) -> None:
    config = tmp_path / "wadaemon.yaml"
    config.write_text(
        f"sessions_path: {tmp_path / 'sessions'}\n"
        "encryption:\n"
        f"  key_file: {tmp_path / 'no-such.key'}\n"
        f"  old_key_files: [{tmp_path / 'no-such-old.key'}]\n"
        "backup:\n"
        "  target: none\n"
        f"  directory: {tmp_path / 'sessions' / 'ignored'}\n"
    )
    proc = wadaemon("check-config", "--config", str(config))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"{config}: ok\n")
    assert "encryption" not in proc.stdout
    assert not (tmp_path / "no-such.key").exists()


# --- known gaps (strict: these start failing once fixed, so the marker must go) -----------------


def test_backup_directory_inside_sessions_through_dotdot_is_refused(tmp_path: Path) -> None:
    text = (
        f"sessions_path: {tmp_path / 'sessions'}\n"
        f"backup:\n  directory: {tmp_path / 'elsewhere' / '..' / 'sessions' / 'backups'}\n"
    )
    with pytest.raises(ConfigError, match="overlaps"):
        parse_config(text, tmp_path / "w.yaml", {})


def test_key_file_error_names_the_config_line(tmp_path: Path) -> None:
    config = tmp_path / "wadaemon.yaml"
    config.write_text(GOOD.format(root=tmp_path))
    proc = wadaemon("check-config", "--config", str(config))
    assert proc.returncode == 78
    number = line_number(GOOD.format(root=tmp_path), f"  key_file: {tmp_path}/session.key")
    assert f"{config}:{number}: encryption.key_file" in proc.stderr


def test_nul_byte_in_a_path_is_a_configuration_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from wadaemon.cli import main

    config = tmp_path / "wadaemon.yaml"
    config.write_text(
        f"sessions_path: {tmp_path / 'sessions'}\n"
        'encryption:\n  key_file: "/etc/wadaemon/session\\0.key"\n'
        f"backup:\n  directory: {tmp_path / 'backups'}\n"
    )
    assert main(["check-config", "--config", str(config)]) == 78
    assert "encryption.key_file" in capsys.readouterr().err


@pytest.mark.parametrize("key", ["debounce_seconds", "interval_seconds"])
def test_infinite_durations_are_refused(tmp_path: Path, key: str) -> None:
    text = f"backup:\n  {key}: .inf\n"
    with pytest.raises(ConfigError, match=rf"w.yaml:2: backup.{key} must be a number"):
        parse_config(text, tmp_path / "w.yaml", {})


# --- the firestore section ----------------------------------------------------------------------


def firestore_text(*lines: str) -> str:
    return "backup:\n  target: firestore\nfirestore:\n" + "".join(f"  {x}\n" for x in lines)


def test_firestore_section_is_read_and_its_path_resolved(tmp_path: Path) -> None:
    service_account(0o600)(tmp_path)
    text = firestore_text(
        "project: my-project",
        "database: sessions-eu",
        "credentials_file: service-account.json",
        "collection_prefix: staging_",
    )
    fs = parse_config(text, tmp_path / "w.yaml", {}).firestore
    assert fs.project == "my-project"
    assert fs.database == "sessions-eu"
    assert fs.credentials_file == tmp_path / "service-account.json"
    assert fs.collection_prefix == "staging_"


def test_firestore_defaults_leave_the_credentials_to_the_client_library(tmp_path: Path) -> None:
    from wadaemon.config import firestore_credentials

    config = parse_config(firestore_text("project: my-project"), tmp_path / "w.yaml", {})
    assert config.firestore.database == "(default)"
    assert config.firestore.credentials_file is None
    assert config.firestore.collection_prefix == ""
    assert firestore_credentials(config.firestore, {}) == (
        None,
        "application default credentials",
    )


def test_firestore_project_from_google_cloud_project(tmp_path: Path) -> None:
    env = {"GOOGLE_CLOUD_PROJECT": "env-project"}
    config = parse_config(firestore_text(), tmp_path / "w.yaml", env)
    assert config.firestore.project == "env-project"
    from_file = parse_config(firestore_text("project: file-project"), tmp_path / "w.yaml", env)
    assert from_file.firestore.project == "file-project"  # the file wins


def test_firestore_emulator_needs_no_credentials(tmp_path: Path) -> None:
    text = firestore_text("project: demo-test", f"credentials_file: {tmp_path / 'absent.json'}")
    with pytest.raises(ConfigError, match="not found"):
        parse_config(text, tmp_path / "w.yaml", {})
    env = {"FIRESTORE_EMULATOR_HOST": "127.0.0.1:8080"}
    assert parse_config(text, tmp_path / "w.yaml", env).firestore.project == "demo-test"


def test_firestore_systemd_credential_wins_over_the_file(tmp_path: Path) -> None:
    from wadaemon.config import firestore_credentials

    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "firestore-credentials").write_text(SERVICE_ACCOUNT)
    text = firestore_text("project: my-project", f"credentials_file: {tmp_path / 'absent.json'}")
    env = {"CREDENTIALS_DIRECTORY": str(creds)}
    config = parse_config(text, tmp_path / "w.yaml", env)  # the absent file is not used
    assert firestore_credentials(config.firestore, env) == (
        creds / "firestore-credentials",
        "systemd credential firestore-credentials",
    )


def test_firestore_section_is_not_checked_for_other_targets(tmp_path: Path) -> None:
    text = "firestore:\n  project: Not An Id\n"
    assert parse_config(text, tmp_path / "w.yaml", {}).firestore.project == "Not An Id"


def test_firestore_target_passes_check_config_with_the_emulator(tmp_path: Path) -> None:
    config = tmp_path / "wadaemon.yaml"
    config.write_text(
        with_line("target: directory", "target: firestore").format(root=tmp_path)
        + FIRESTORE.format(project="demo-test")
    )
    write_new_key(tmp_path / "session.key")
    env = clean_environ(FIRESTORE_EMULATOR_HOST="127.0.0.1:8080")
    proc = wadaemon("check-config", "--config", str(config), env=env)
    assert proc.returncode == 0, proc.stderr
