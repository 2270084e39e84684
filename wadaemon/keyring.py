"""Encryption keys and the sealed blob format.

A key file holds 64 hexadecimal characters (a 256-bit master key). From each master key, HKDF
derives independent subkeys: one for AES-256-GCM, one for piece identifiers (HMAC-SHA256), one for
content digests, one for the MACs of backup heads (HMAC-SHA256), and a short public key id stored
beside every blob so that restore can pick the right key from the keyring (the current key plus
old, decrypt-only keys).

Blob layout (all integers big-endian):
    magic b"WAD1" | flags (1 byte) | key id (8 bytes) | nonce (12 bytes) | ciphertext + GCM tag
The header and a caller-supplied context (account id, kind, generation) are the associated data,
so a blob moved to another account or generation, or with its header edited, fails to decrypt.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from wadaemon.config import Config
from wadaemon.errors import ConfigError, DecryptError, WadaemonError
from wadaemon.private_file import read_private_file

MAGIC = b"WAD1"
FLAG_ZLIB = 0x01
KEY_ID_BYTES = 8
NONCE_BYTES = 12
HEADER_BYTES = len(MAGIC) + 1 + KEY_ID_BYTES + NONCE_BYTES
MAX_PLAINTEXT = 256 * 1024 * 1024
CREDENTIAL_NAME = "session-key"


def _derive(master: bytes, label: str, length: int = 32) -> bytes:
    return HKDF(
        algorithm=hashes.SHA256(), length=length, salt=None, info=f"wadaemon/v1/{label}".encode()
    ).derive(master)


SAMPLE_BYTES = 4096  # compressed first to see whether the rest is worth compressing


@dataclass(frozen=True)
class Key:
    """One master key and the subkeys derived from it."""

    source: str
    key_id: str
    _aead: AESGCM = field(repr=False)
    _piece_key: bytes = field(repr=False)
    _digest_key: bytes = field(repr=False)
    _head_key: bytes = field(repr=False)

    @classmethod
    def from_bytes(cls, master: bytes, source: str) -> Key:
        if len(master) != 32:
            raise ValueError("a master key is 32 bytes")
        return cls(
            source=source,
            key_id=_derive(master, "key-id", KEY_ID_BYTES).hex(),
            _aead=AESGCM(_derive(master, "aes-256-gcm")),
            _piece_key=_derive(master, "piece-id"),
            _digest_key=_derive(master, "digest"),
            _head_key=_derive(master, "head-mac"),
        )

    def piece_id(self, data: bytes | memoryview) -> str:
        return hmac.new(self._piece_key, data, hashlib.sha256).hexdigest()

    def digest(self, data: bytes) -> str:
        return hmac.new(self._digest_key, data, hashlib.sha256).hexdigest()

    def head_mac(self, data: bytes) -> str:
        """The MAC of a backup head (see Head.mac_input)."""
        return hmac.new(self._head_key, data, hashlib.sha256).hexdigest()


def _compressible(data: bytes) -> bool:
    """Whether compressing is worth it: a sample of random bytes (key material) does not
    shrink, and compressing 64 KiB of it costs about a millisecond for nothing."""
    if len(data) <= 2 * SAMPLE_BYTES:
        return True
    return len(zlib.compress(data[:SAMPLE_BYTES], 1)) < SAMPLE_BYTES * 0.9


class Keyring:
    """The current key (encrypts) and old keys (decrypt only)."""

    def __init__(self, current: Key, old: Sequence[Key] = ()) -> None:
        self.current = current
        self.old = tuple(old)  # as given, in order (key_watch watches the files they came from)
        self.by_id: dict[str, Key] = {}
        for key in (current, *old):
            self.by_id.setdefault(key.key_id, key)

    def describe(self) -> str:
        olds = [k for k in self.by_id.values() if k is not self.current]
        text = f"current key {self.current.key_id} ({self.current.source})"
        if olds:
            text += "; old keys " + ", ".join(f"{k.key_id} ({k.source})" for k in olds)
        return text

    def seal(self, plaintext: bytes, context: bytes, *, compress: bool = True) -> bytes:
        flags = 0
        body = plaintext
        if compress and _compressible(plaintext):
            packed = zlib.compress(plaintext, 1)  # level 6 cost 4x the CPU for a few % less
            if len(packed) < len(plaintext):
                body, flags = packed, FLAG_ZLIB
        nonce = os.urandom(NONCE_BYTES)
        header = MAGIC + bytes([flags]) + bytes.fromhex(self.current.key_id) + nonce
        return header + self.current._aead.encrypt(nonce, body, header + context)

    def key_for(self, blob: bytes) -> Key:
        """The key a blob was sealed with; DecryptError if the keyring lacks it."""
        key_id = blob_key_id(blob)
        key = self.by_id.get(key_id)
        if key is None:
            raise DecryptError(
                f"sealed with key {key_id}, which is not in the keyring ({self.describe()}); "
                "add the key file that was in use then to encryption.old_key_files"
            )
        return key

    def open(self, blob: bytes, context: bytes) -> bytes:
        key = self.key_for(blob)
        header = blob[:HEADER_BYTES]
        flags = header[4]
        nonce = header[5 + KEY_ID_BYTES :]
        try:
            body = key._aead.decrypt(nonce, blob[HEADER_BYTES:], header + context)
        except InvalidTag:
            raise DecryptError(
                f"authentication failed with key {key.key_id}: the blob was altered, "
                "truncated, or belongs to another account or generation"
            ) from None
        if flags & FLAG_ZLIB:
            inflater = zlib.decompressobj()
            try:
                body = inflater.decompress(body, MAX_PLAINTEXT)
            except zlib.error as exc:
                raise DecryptError(f"authenticated but does not decompress: {exc}") from None
            if inflater.unconsumed_tail:
                raise DecryptError("decompresses to more than the allowed size")
        return body


def blob_key_id(blob: bytes) -> str:
    """The id of the key a blob says it was sealed with."""
    if len(blob) < HEADER_BYTES + 16 or blob[:4] != MAGIC:
        raise DecryptError("not a wadaemon blob (bad header or truncated)")
    return blob[5 : 5 + KEY_ID_BYTES].hex()


# --- key files ----------------------------------------------------------------------------------


def parse_key(text: str, source: str) -> bytes:
    cleaned = "".join(text.split())
    if len(cleaned) != 64:
        raise ConfigError(
            f"{source}: a key file must hold exactly 64 hexadecimal characters (a 256-bit key), "
            f"found {len(cleaned)} characters; create a key with `wadaemon keygen PATH`"
        )
    try:
        return bytes.fromhex(cleaned)
    except ValueError:
        raise ConfigError(
            f"{source}: the key is not hexadecimal (only 0-9 and a-f are allowed); "
            "create a key with `wadaemon keygen PATH`"
        ) from None


def _missing_key_hint(path: Path, old: bool) -> str:
    if old:
        return (
            "put back the old key from the copy you kept (a new key cannot decrypt what the old "
            "one sealed), or remove it from encryption.old_key_files"
        )
    return (
        f"create one with `wadaemon keygen {path}` and keep a copy somewhere safe: "
        "without it no backup can be restored"
    )


def read_key_file(path: Path, setting: str, *, old: bool = False) -> Key:
    """Read a key file. `setting` says where it was configured (for example
    `/etc/wadaemon/wadaemon.yaml:12: encryption.key_file`) and starts every error message."""
    text = read_private_file(path, setting, "key file", _missing_key_hint(path, old))
    return Key.from_bytes(parse_key(text, f"{setting}: {path}"), str(path))


def current_key_path(key_file: Path, environ: Mapping[str, str]) -> tuple[Path, str]:
    """The systemd credential wins over encryption.key_file when it is present."""
    creds = environ.get("CREDENTIALS_DIRECTORY")
    if creds and (Path(creds) / CREDENTIAL_NAME).exists():
        return Path(creds) / CREDENTIAL_NAME, f"systemd credential {CREDENTIAL_NAME}"
    return key_file, "encryption.key_file"


def load_keyring(
    key_file: Path,
    old_key_files: Sequence[Path],
    environ: Mapping[str, str] | None = None,
    where: Callable[[str], str] = lambda setting: setting,
) -> Keyring:
    """The keyring from the configured files; `where` turns a setting's dotted name into the
    place it was configured, for error messages."""
    env = os.environ if environ is None else environ
    path, setting = current_key_path(key_file, env)
    if setting == "encryption.key_file":
        setting = where(setting)
    current = read_key_file(path, setting)
    old_setting = where("encryption.old_key_files")
    old = [read_key_file(p, old_setting, old=True) for p in old_key_files]
    return Keyring(current, old)


def load_keyring_for(config: Config) -> Keyring:
    """The keyring a configuration names; errors point at the configuration's lines."""
    return load_keyring(
        config.encryption.key_file,
        config.encryption.old_key_files,
        where=lambda setting: config.where(*setting.split(".")),
    )


def write_new_key(path: Path) -> Key:
    """Create a key file with mode 0600; never overwrite an existing file."""
    master = secrets.token_bytes(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise WadaemonError(
            f"{path} already exists; refusing to overwrite it (a replaced key makes every backup "
            "sealed with it unreadable). Choose another path, or move the old key away first."
        ) from None
    except OSError as exc:
        raise WadaemonError(f"{path}: cannot create the key file: {exc.strerror}") from None
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write(master.hex() + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.chmod(path, 0o600)  # in case the umask removed bits we meant to keep
    return Key.from_bytes(master, str(path))
