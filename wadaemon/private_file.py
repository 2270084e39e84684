"""Files that hold secrets (encryption keys, service account keys): checked before reading."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from wadaemon.errors import ConfigError


def read_private_file(path: Path, where: str, what: str, missing_hint: str) -> str:
    """The text of a secret file that only its owner may access.

    `where` says where it was configured (`file:line: key`) and starts every message; `what`
    names the file for a reader ("key file", "credentials file").
    """
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ConfigError(f"{where}: {what} {path} not found; {missing_hint}.") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{where}: cannot access the {what} {path}: {exc}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{where}: the {what} {path} is not a regular file.")
    if st.st_mode & 0o077 and not _systemd_credential(path):
        raise ConfigError(
            f"{where}: the {what} {path} has mode {stat.S_IMODE(st.st_mode):04o}, so group or "
            f"others can access the secret in it; run `chmod 600 {path}`."
        )
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where}: cannot read the {what} {path}: {exc}") from None


def _systemd_credential(path: Path) -> bool:
    """systemd passes credentials in a private directory it controls (systemd 257 makes the file
    root-owned, mode 0440, readable by the service through an ACL): its mode is systemd's."""
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    return creds is not None and creds != "" and path.parent == Path(creds)
