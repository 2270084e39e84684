"""Configuration: read once from YAML, validated, frozen.

Every problem is reported as one ConfigError that names the file, the key (with its line) and the
fix. Relative paths in the file are taken relative to the directory that holds the file.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from wadaemon.errors import ConfigError
from wadaemon.private_file import read_private_file

DEFAULT_CONFIG_PATH = Path("/etc/wadaemon/wadaemon.yaml")
CONFIG_ENV = "WADAEMON_CONFIG"
SESSIONS_PATH_ENV = "SESSIONS_PATH"
BACKUP_TARGETS = ("directory", "firestore", "none")
LOG_LEVELS = ("debug", "info", "warning", "error")
# Read by the Google client library itself; wadaemon honours them the same way.
EMULATOR_ENV = "FIRESTORE_EMULATOR_HOST"
PROJECT_ENV = "GOOGLE_CLOUD_PROJECT"
FIRESTORE_CREDENTIAL_NAME = "firestore-credentials"  # systemd credential ($CREDENTIALS_DIRECTORY)
_PROJECT_RE = re.compile(r"^([a-z0-9.-]+:)?[a-z][a-z0-9-]{4,28}[a-z0-9]$")
_DATABASE_RE = re.compile(r"^(\(default\)|[a-z][a-z0-9-]{2,61}[a-z0-9])$")
_PREFIX_RE = re.compile(r"^[A-Za-z0-9_-]{0,64}$")
_INSTANCE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


@dataclass(frozen=True)
class EncryptionConfig:
    key_file: Path
    old_key_files: tuple[Path, ...]


@dataclass(frozen=True)
class BackupConfig:
    target: str
    directory: Path
    debounce_seconds: float
    interval_seconds: float
    keep_generations: int
    timeout_seconds: float


@dataclass(frozen=True)
class FirestoreConfig:
    project: str  # from the file, else $GOOGLE_CLOUD_PROJECT; "" when neither says
    database: str
    credentials_file: Path | None  # None: not configured (ADC, or the systemd credential)
    collection_prefix: str


@dataclass(frozen=True)
class RestoreConfig:
    on_boot: bool
    timeout_seconds: float
    parallelism: int


@dataclass(frozen=True)
class VerifyConfig:
    interval_hours: float = 24.0  # restore drills of every account; 0: none


@dataclass(frozen=True)
class WhatsAppConfig:
    enabled: bool
    log_level: str = "warning"  # whatsmeow's own log level
    pairing_timeout_seconds: float = 180.0
    retry_after_logout: bool = True
    health_check_seconds: float = 60.0


@dataclass(frozen=True)
class InstanceConfig:
    id: str  # this instance's name among those sharing one Firestore project
    max_accounts: int = 0  # the most accounts it drives; 0: its fair share, no other cap


@dataclass(frozen=True)
class LeaseConfig:
    ttl_seconds: float = 30.0
    renew_seconds: float = 10.0


def default_instance_id() -> str:
    """The host name, as an instance id (characters an id may not hold become '-')."""
    name = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:63].lstrip("._-")
    return name or "wadaemon"


@dataclass(frozen=True)
class WebhookConfig:
    url: str = ""  # "" : no webhook
    secret_file: Path | None = None  # the HMAC-SHA256 key (its bytes, stripped)
    max_attempts: int = 20  # then the event is dropped from the queue, logged and counted
    timeout_seconds: float = 10.0


@dataclass(frozen=True)
class MessagesConfig:
    enabled: bool = True
    path: Path = Path("/var/lib/wadaemon/messages")  # the local queue (and the embedded store)
    queue_max_mb: int = 512  # the local queue's size bound
    download_media: bool = False
    media_max_mb: int = 1024  # the media directory's size cap
    send_gap_seconds: float = 3.0  # the least time between two sends of one account
    per_recipient_per_hour: int = 20  # the most sends to one recipient in an hour
    send_attempts: int = 8  # transient failures retried this many times, then failed
    webhook: WebhookConfig = field(default_factory=WebhookConfig)


@dataclass(frozen=True)
class Config:
    path: Path
    sessions_path: Path
    socket_path: Path
    log_level: str
    encryption: EncryptionConfig
    backup: BackupConfig
    firestore: FirestoreConfig
    restore: RestoreConfig
    whatsapp: WhatsAppConfig
    verify: VerifyConfig = field(default_factory=VerifyConfig)
    instance: InstanceConfig = field(default_factory=lambda: InstanceConfig(default_instance_id()))
    leases: LeaseConfig = field(default_factory=LeaseConfig)
    messages: MessagesConfig = field(default_factory=MessagesConfig)
    lines: Mapping[tuple[str, ...], int] = field(default_factory=dict, compare=False, repr=False)

    def where(self, *key: str) -> str:
        """`file:line: dotted.key`, for messages about a configured value."""
        return _Source(self.path, dict(self.lines)).where(key)


# --- schema -------------------------------------------------------------------------------------
# A leaf is (kind, default). Kinds: "path", "path?" (a path or "" for none), "paths", "str",
# "bool", "int>=1", "float>0", "float>=0", "hours>=0", "choice:<a|b>". A nested dict is a
# section.

Schema = Mapping[str, Any]

SCHEMA: Schema = {
    "sessions_path": ("path", "/var/lib/wadaemon/sessions"),
    "socket_path": ("path", "/run/wadaemon/wadaemon.sock"),
    "log_level": ("choice:" + "|".join(LOG_LEVELS), "info"),
    "encryption": {
        "key_file": ("path", "/etc/wadaemon/session.key"),
        "old_key_files": ("paths", []),
    },
    "backup": {
        "target": ("choice:" + "|".join(BACKUP_TARGETS), "directory"),
        "directory": ("path", "/var/backups/wadaemon"),
        "debounce_seconds": ("float>=0", 1.0),
        "interval_seconds": ("float>0", 300.0),
        "keep_generations": ("int>=1", 5),
        "timeout_seconds": ("float>0", 600.0),
    },
    "firestore": {
        "project": ("str", ""),
        "database": ("str", "(default)"),
        "credentials_file": ("path?", ""),
        "collection_prefix": ("str", ""),
    },
    "restore": {
        "on_boot": ("bool", True),
        "timeout_seconds": ("float>0", 120.0),
        "parallelism": ("int>=1", 8),
    },
    "verify": {
        "interval_hours": ("hours>=0", 24.0),
    },
    "instance": {
        "id": ("str", ""),
        "max_accounts": ("int>=0", 0),
    },
    "leases": {
        "ttl_seconds": ("float>0", 30.0),
        "renew_seconds": ("float>0", 10.0),
    },
    "messages": {
        "enabled": ("bool", True),
        "path": ("path?", ""),
        "queue_max_mb": ("int>=1", 512),
        "download_media": ("bool", False),
        "media_max_mb": ("int>=1", 1024),
        "send_gap_seconds": ("float>=0", 3.0),
        "per_recipient_per_hour": ("int>=1", 20),
        "send_attempts": ("int>=1", 8),
        "webhook": {
            "url": ("str", ""),
            "secret_file": ("path?", ""),
            "max_attempts": ("int>=1", 20),
            "timeout_seconds": ("float>0", 10.0),
        },
    },
    "whatsapp": {
        "enabled": ("bool", True),
        "log_level": ("choice:" + "|".join(LOG_LEVELS), "warning"),
        "pairing_timeout_seconds": ("float>0", 180.0),
        "retry_after_logout": ("bool", True),
        "health_check_seconds": ("float>0", 60.0),
    },
}


class _Source:
    """Where a value came from, for error messages."""

    def __init__(self, path: Path, lines: dict[tuple[str, ...], int]) -> None:
        self.path = path
        self.lines = lines

    def where(self, key: tuple[str, ...]) -> str:
        line = self.lines.get(key)
        dotted = ".".join(key)
        return f"{self.path}:{line}: {dotted}" if line else f"{self.path}: {dotted}"


def config_path_from(cli_value: str | None, environ: Mapping[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    if cli_value:
        return Path(cli_value)
    if env.get(CONFIG_ENV):
        return Path(env[CONFIG_ENV])
    return DEFAULT_CONFIG_PATH


def load_config(path: Path, environ: Mapping[str, str] | None = None) -> Config:
    """Read, validate and freeze the configuration at `path`."""
    env = os.environ if environ is None else environ
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: configuration file not found. Create it (the documented example is "
            f"etc/wadaemon/wadaemon.yaml) or point --config / ${CONFIG_ENV} at another file."
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the configuration file: {exc}") from None
    return parse_config(text, path, env)


def parse_config(text: str, path: Path, environ: Mapping[str, str]) -> Config:
    raw, lines = _parse_yaml(text, path)
    src = _Source(path, lines)
    values = _apply_schema(SCHEMA, raw, (), src)
    base = path.parent if path.parent != Path("") else Path(".")

    def p(value: str) -> Path:
        candidate = Path(value).expanduser()
        if not candidate.is_absolute():
            candidate = base / candidate
        return Path(os.path.normpath(candidate.absolute()))

    sessions = values["sessions_path"]
    if environ.get(SESSIONS_PATH_ENV):
        sessions = environ[SESSIONS_PATH_ENV]
        if not Path(sessions).is_absolute():
            raise ConfigError(
                f"${SESSIONS_PATH_ENV}={sessions!r} is not an absolute path; set it to an "
                "absolute directory such as /var/lib/wadaemon/sessions (the systemd drop-in does)."
            )
    enc, bak, fs, rst, wa, ver = (
        values["encryption"],
        values["backup"],
        values["firestore"],
        values["restore"],
        values["whatsapp"],
        values["verify"],
    )
    inst, lease, msg = values["instance"], values["leases"], values["messages"]
    hook = msg["webhook"]
    config = Config(
        path=path,
        sessions_path=p(sessions),
        socket_path=p(values["socket_path"]),
        log_level=values["log_level"],
        encryption=EncryptionConfig(
            key_file=p(enc["key_file"]),
            old_key_files=tuple(p(x) for x in enc["old_key_files"]),
        ),
        backup=BackupConfig(
            target=bak["target"],
            directory=p(bak["directory"]),
            debounce_seconds=float(bak["debounce_seconds"]),
            interval_seconds=float(bak["interval_seconds"]),
            keep_generations=int(bak["keep_generations"]),
            timeout_seconds=float(bak["timeout_seconds"]),
        ),
        firestore=FirestoreConfig(
            project=fs["project"] or environ.get(PROJECT_ENV, ""),
            database=fs["database"],
            credentials_file=p(fs["credentials_file"]) if fs["credentials_file"] else None,
            collection_prefix=fs["collection_prefix"],
        ),
        restore=RestoreConfig(
            on_boot=rst["on_boot"],
            timeout_seconds=float(rst["timeout_seconds"]),
            parallelism=int(rst["parallelism"]),
        ),
        whatsapp=WhatsAppConfig(
            enabled=wa["enabled"],
            log_level=wa["log_level"],
            pairing_timeout_seconds=float(wa["pairing_timeout_seconds"]),
            retry_after_logout=wa["retry_after_logout"],
            health_check_seconds=float(wa["health_check_seconds"]),
        ),
        verify=VerifyConfig(interval_hours=float(ver["interval_hours"])),
        instance=InstanceConfig(
            id=inst["id"] or default_instance_id(), max_accounts=int(inst["max_accounts"])
        ),
        leases=LeaseConfig(
            ttl_seconds=float(lease["ttl_seconds"]), renew_seconds=float(lease["renew_seconds"])
        ),
        messages=MessagesConfig(
            enabled=msg["enabled"],
            # beside the sessions directory, in the daemon's state directory
            path=p(msg["path"]) if msg["path"] else p(sessions).parent / "messages",
            queue_max_mb=int(msg["queue_max_mb"]),
            download_media=msg["download_media"],
            media_max_mb=int(msg["media_max_mb"]),
            send_gap_seconds=float(msg["send_gap_seconds"]),
            per_recipient_per_hour=int(msg["per_recipient_per_hour"]),
            send_attempts=int(msg["send_attempts"]),
            webhook=WebhookConfig(
                url=hook["url"],
                secret_file=p(hook["secret_file"]) if hook["secret_file"] else None,
                max_attempts=int(hook["max_attempts"]),
                timeout_seconds=float(hook["timeout_seconds"]),
            ),
        ),
        lines=lines,
    )
    _check_consistency(config, src, environ)
    return config


def _check_consistency(config: Config, src: _Source, environ: Mapping[str, str]) -> None:
    if config.backup.target == "firestore":
        _check_firestore(config.firestore, src, environ)
    if not _INSTANCE_RE.match(config.instance.id):
        raise ConfigError(
            f"{src.where(('instance', 'id'))}: {config.instance.id!r} is not an instance id; use "
            "1 to 63 letters, digits, '.', '_' or '-', starting with a letter or digit (such as "
            "the host name), and a different one on every host that shares the backups."
        )
    messages, sessions = config.messages.path, config.sessions_path
    if messages == sessions or sessions in messages.parents or messages in sessions.parents:
        raise ConfigError(
            f"{src.where(('messages', 'path'))}: {messages} overlaps sessions_path {sessions}; "
            "keep the messages beside the sessions, not among them (the default is "
            f"{sessions.parent / 'messages'})."
        )
    hook = config.messages.webhook
    if hook.url and not hook.url.startswith(("http://", "https://")):
        raise ConfigError(
            f"{src.where(('messages', 'webhook', 'url'))}: {hook.url!r} is not an http:// or "
            "https:// URL; give the receiver's full URL, or remove the key for no webhook."
        )
    if hook.url and hook.secret_file is None:
        raise ConfigError(
            f"{src.where(('messages', 'webhook', 'url'))}: a webhook needs "
            "messages.webhook.secret_file (the key its deliveries are signed with, so the "
            "receiver can tell them from forgeries); create one with "
            "`head -c 32 /dev/urandom | xxd -p -c 64 > FILE; chmod 600 FILE`."
        )
    leases = config.leases
    if leases.renew_seconds * 2 > leases.ttl_seconds:
        raise ConfigError(
            f"{src.where(('leases', 'renew_seconds'))}: {leases.renew_seconds:g} s is more than "
            f"half of leases.ttl_seconds ({leases.ttl_seconds:g} s), so one late renewal would "
            "lose a lease; renew at most every ttl/2 seconds (the default is ttl/3: 10 of 30)."
        )
    sessions = config.sessions_path
    if config.backup.target == "directory":
        backups = config.backup.directory.resolve()
        sessions = sessions.resolve()  # through symlinks too
        if backups == sessions or sessions in backups.parents or backups in sessions.parents:
            raise ConfigError(
                f"{src.where(('backup', 'directory'))}: the backup directory {backups} overlaps "
                f"sessions_path {sessions}; put backups outside the sessions directory (ideally "
                "on another disk)."
            )


def firestore_credentials(
    fs: FirestoreConfig, environ: Mapping[str, str]
) -> tuple[Path | None, str]:
    """The service-account file to use and where it was configured, or (None, why) when the
    client library finds credentials itself (the emulator, $GOOGLE_APPLICATION_CREDENTIALS, or
    the metadata server on Google Cloud). The systemd credential wins over the file, as the
    session key's does."""
    if environ.get(EMULATOR_ENV):
        return None, f"${EMULATOR_ENV} (the emulator needs no credentials)"
    creds = environ.get("CREDENTIALS_DIRECTORY")
    if creds and (Path(creds) / FIRESTORE_CREDENTIAL_NAME).exists():
        credential = Path(creds) / FIRESTORE_CREDENTIAL_NAME
        return credential, f"systemd credential {FIRESTORE_CREDENTIAL_NAME}"
    if fs.credentials_file is not None:
        return fs.credentials_file, "firestore.credentials_file"
    return None, "application default credentials"


def _check_firestore(fs: FirestoreConfig, src: _Source, environ: Mapping[str, str]) -> None:
    def where(key: str) -> str:
        return src.where(("firestore", key))

    if not fs.project:
        raise ConfigError(
            f"{where('project')}: backup.target is firestore but no project is set; set "
            f"firestore.project to your Google Cloud project id (or export ${PROJECT_ENV})."
        )
    if not _PROJECT_RE.match(fs.project):
        raise ConfigError(
            f"{where('project')}: {fs.project!r} is not a Google Cloud project id (6 to 30 "
            "characters: lowercase letters, digits and '-', starting with a letter); use the id "
            "that `gcloud projects list` shows, not the project's display name."
        )
    if not _DATABASE_RE.match(fs.database):
        raise ConfigError(
            f"{where('database')}: {fs.database!r} is not a Firestore database id; use "
            "\"(default)\" or the id of a named database (lowercase letters, digits and '-')."
        )
    if not _PREFIX_RE.match(fs.collection_prefix):
        raise ConfigError(
            f"{where('collection_prefix')}: {fs.collection_prefix!r} cannot start a collection "
            "name; use up to 64 letters, digits, '_' and '-' (for example \"staging_\")."
        )
    path, setting = firestore_credentials(fs, environ)
    if path is None or setting != "firestore.credentials_file":
        return
    _check_credentials_file(path, where("credentials_file"))


def _check_credentials_file(path: Path, where: str) -> None:
    hint = (
        "create a JSON key for a service account that has the role roles/datastore.user "
        f"(`gcloud iam service-accounts keys create {path} --iam-account=ACCOUNT`), "
        f"then `chmod 600 {path}`"
    )
    text = read_private_file(path, where, "credentials file", hint)
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if not isinstance(data, dict) or not isinstance(data.get("type"), str):
        raise ConfigError(
            f'{where}: {path} is not a Google credentials JSON file (no "type" field); {hint}.'
        )


# --- YAML with line numbers ---------------------------------------------------------------------


def _parse_yaml(text: str, path: Path) -> tuple[dict[str, Any], dict[tuple[str, ...], int]]:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ConfigError(f"{where}: not valid YAML ({exc.problem}); fix the syntax.") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc}); fix the syntax.") from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict) or not isinstance(node, yaml.MappingNode):
        raise ConfigError(
            f"{path}: the configuration must be a YAML mapping of keys to values, "
            f"not a {type(data).__name__}; see etc/wadaemon/wadaemon.yaml for the layout."
        )
    lines: dict[tuple[str, ...], int] = {}
    _record_lines(node, (), lines, path)
    return data, lines


def _record_lines(
    node: yaml.Node, prefix: tuple[str, ...], lines: dict[tuple[str, ...], int], path: Path
) -> None:
    if not isinstance(node, yaml.MappingNode):
        return
    seen: set[str] = set()
    for key_node, value_node in node.value:
        key = str(key_node.value)
        full = (*prefix, key)
        line = key_node.start_mark.line + 1
        if key in seen:
            raise ConfigError(
                f"{path}:{line}: {'.'.join(full)} appears twice; keep only one of them."
            )
        seen.add(key)
        lines[full] = line
        _record_lines(value_node, full, lines, path)


# --- validation ---------------------------------------------------------------------------------


def _apply_schema(
    schema: Schema, raw: Any, prefix: tuple[str, ...], src: _Source
) -> dict[str, Any]:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{src.where(prefix)} must be a mapping with the keys {', '.join(schema)}; "
            f"got {_describe(raw)}."
        )
    out: dict[str, Any] = {}
    for key in raw:
        if not isinstance(key, str) or key not in schema:
            close = difflib.get_close_matches(str(key), list(schema), n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(schema)}."
            raise ConfigError(f"{src.where((*prefix, str(key)))}: unknown key; {hint}")
    for key, spec in schema.items():
        full = (*prefix, key)
        if isinstance(spec, Mapping):
            out[key] = _apply_schema(spec, raw.get(key), full, src)
            continue
        kind, default = spec
        value = raw.get(key, default)
        out[key] = _CHECKS[kind.split(":")[0]](value, kind, full, src)
    return out


def _describe(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    return f"{type(value).__name__} {value!r}"


def _fail(full: tuple[str, ...], src: _Source, expected: str, value: Any) -> ConfigError:
    return ConfigError(f"{src.where(full)} must be {expected}; got {_describe(value)}.")


def _check_path(value: Any, kind: str, full: tuple[str, ...], src: _Source) -> str:
    if not isinstance(value, str) or not value.strip() or "\0" in value:
        raise _fail(full, src, "a path (a non-empty string without NUL characters)", value)
    return value


def _check_optional_path(value: Any, kind: str, full: tuple[str, ...], src: _Source) -> str:
    if value is None or value == "":
        return ""
    if not isinstance(value, str) or not value.strip() or "\0" in value:
        raise _fail(full, src, 'a path, or "" for none', value)
    return value


def _check_str(value: Any, kind: str, full: tuple[str, ...], src: _Source) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _fail(full, src, "a string (quote it)", value)
    return value.strip()


def _check_paths(value: Any, kind: str, full: tuple[str, ...], src: _Source) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise _fail(full, src, "a list of paths, such as [/etc/wadaemon/old.key]", value)
    return [_check_path(v, kind, full, src) for v in value]


def _check_bool(value: Any, kind: str, full: tuple[str, ...], src: _Source) -> bool:
    if not isinstance(value, bool):
        raise _fail(full, src, "true or false", value)
    return value


def _check_int(value: Any, kind: str, full: tuple[str, ...], src: _Source) -> int:
    low = int(kind.split(">=", 1)[1])
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise _fail(full, src, f"a whole number of at least {low}", value)
    return value


def _check_float(value: Any, kind: str, full: tuple[str, ...], src: _Source) -> float:
    strict = kind == "float>0"
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or value < 0 or (strict and value == 0):
        bound = "greater than 0" if strict else "0 or more"
        raise _fail(full, src, f"a number of seconds {bound}", value)
    return float(value)


def _check_hours(value: Any, kind: str, full: tuple[str, ...], src: _Source) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or value < 0:
        raise _fail(full, src, "a number of hours, 0 or more (fractions allowed; 0: off)", value)
    return float(value)


def _check_choice(value: Any, kind: str, full: tuple[str, ...], src: _Source) -> str:
    choices = kind.split(":", 1)[1].split("|")
    if value not in choices:
        raise _fail(full, src, "one of " + ", ".join(choices), value)
    return str(value)


_CHECKS: dict[str, Callable[[Any, str, tuple[str, ...], _Source], Any]] = {
    "path": _check_path,
    "path?": _check_optional_path,
    "paths": _check_paths,
    "str": _check_str,
    "bool": _check_bool,
    "int>=1": _check_int,
    "int>=0": _check_int,
    "float>0": _check_float,
    "float>=0": _check_float,
    "hours>=0": _check_hours,
    "choice": _check_choice,
}
