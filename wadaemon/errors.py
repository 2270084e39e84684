"""Errors that reach the user: each message names the problem and the fix."""

from __future__ import annotations

import os

EXIT_FAILURE = 1
EXIT_CONFIG = 78  # EX_CONFIG from sysexits.h; the unit uses RestartPreventExitStatus=78


class WadaemonError(Exception):
    """A failure with a message fit to show the user as it is."""

    exit_code = EXIT_FAILURE


class ConfigError(WadaemonError):
    """The configuration (file, key file, environment) cannot be used."""

    exit_code = EXIT_CONFIG


class DecryptError(WadaemonError):
    """A stored blob cannot be decrypted or authenticated."""


class IntegrityError(WadaemonError):
    """Data does not match what its manifest or SQLite says it must be."""


class SnapshotError(WadaemonError):
    """A consistent snapshot of an account directory could not be taken."""


class UnreadableSession(SnapshotError):
    """The daemon's user may not read (part of) an account directory."""


def unreadable_message(path: object, strerror: str | None) -> str:
    import pwd

    try:
        user = pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        user = str(os.geteuid())
    return (
        f"{path}: {strerror or 'permission denied'}: the daemon's user ({user}) cannot read it, "
        "so this account is not backed up; give that user read access (a group shared with it, "
        "`chmod -R g+rX` on the account directory and a umask of 007 for the program that "
        "writes it), or run that program as the daemon's user"
    )
