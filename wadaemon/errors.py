"""Errors that reach the user: each message names the problem and the fix."""

from __future__ import annotations

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
