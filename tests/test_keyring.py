"""Keys, key files and sealed blobs: what must decrypt, and everything that must not."""

from __future__ import annotations

import hashlib
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from wadaemon import keyring as keyring_module
from wadaemon.errors import ConfigError, DecryptError
from wadaemon.keyring import (
    FLAG_ZLIB,
    HEADER_BYTES,
    KEY_ID_BYTES,
    MAGIC,
    NONCE_BYTES,
    Key,
    Keyring,
    blob_key_id,
    load_keyring,
    read_key_file,
    write_new_key,
)

TAG_BYTES = 16
CONTEXT = b"account-a/pieces/7"
OTHER_ACCOUNT = b"account-b/pieces/7"


def new_key(source: str = "test key") -> Key:
    return Key.from_bytes(os.urandom(32), source)


def ring(*old: Key, current: Key | None = None) -> Keyring:
    return Keyring(current or new_key(), old)


def write_key(path: Path, master: bytes | None = None, mode: int = 0o600) -> Key:
    master = os.urandom(32) if master is None else master
    path.write_text(master.hex() + "\n")
    path.chmod(mode)
    return Key.from_bytes(master, str(path))


def flags_of(blob: bytes) -> int:
    return blob[len(MAGIC)]


# --- seal and open ------------------------------------------------------------------------------

COMPRESSIBLE = b"WhatsApp session row " * 5000
INCOMPRESSIBLE = os.urandom(100_000)


@pytest.mark.parametrize(
    "data", [COMPRESSIBLE, INCOMPRESSIBLE, b"", b"x"], ids=["compressible", "random", "empty", "1"]
)
@pytest.mark.parametrize("compress", [True, False], ids=["zlib", "raw"])
def test_round_trip(data: bytes, compress: bool) -> None:
    keys = ring()
    blob = keys.seal(data, CONTEXT, compress=compress)
    assert blob.startswith(MAGIC)
    assert blob_key_id(blob) == keys.current.key_id
    assert keys.open(blob, CONTEXT) == data


def test_compression_is_used_only_when_it_helps() -> None:
    keys = ring()
    packed = keys.seal(COMPRESSIBLE, CONTEXT)
    assert flags_of(packed) & FLAG_ZLIB
    assert len(packed) < len(COMPRESSIBLE) // 10
    # random data is stored as it is: exactly header + data + tag, never larger
    raw = keys.seal(INCOMPRESSIBLE, CONTEXT)
    assert not flags_of(raw) & FLAG_ZLIB
    assert len(raw) == HEADER_BYTES + len(INCOMPRESSIBLE) + TAG_BYTES
    unpacked = keys.seal(COMPRESSIBLE, CONTEXT, compress=False)
    assert not flags_of(unpacked) & FLAG_ZLIB
    assert len(unpacked) == HEADER_BYTES + len(COMPRESSIBLE) + TAG_BYTES


def test_plaintext_does_not_appear_in_the_blob() -> None:
    secret = b"+31612345678 private message " * 4
    blob = ring().seal(secret, CONTEXT, compress=False)
    assert b"+31612345678" not in blob
    assert b"private message" not in blob


def test_every_seal_uses_a_fresh_nonce() -> None:
    keys = ring()
    blobs = [keys.seal(b"same data", CONTEXT) for _ in range(200)]
    nonces = {b[len(MAGIC) + 1 + KEY_ID_BYTES : HEADER_BYTES] for b in blobs}
    assert len(nonces) == len(blobs)
    assert all(len(n) == NONCE_BYTES for n in nonces)
    assert len({b[HEADER_BYTES:] for b in blobs}) == len(blobs)


def test_blob_for_another_account_does_not_open() -> None:
    keys = ring()
    blob = keys.seal(COMPRESSIBLE, CONTEXT)
    for context in (OTHER_ACCOUNT, b"", CONTEXT + b"0", CONTEXT[:-1]):
        with pytest.raises(DecryptError) as info:
            keys.open(blob, context)
        message = str(info.value)
        assert "belongs to another account" in message
        assert "altered" in message
        assert keys.current.key_id in message


@pytest.mark.parametrize("compress", [True, False], ids=["zlib", "raw"])
def test_any_changed_byte_is_detected(compress: bool) -> None:
    keys = ring()
    data = b"abc" * 30
    blob = keys.seal(data, CONTEXT, compress=compress)
    assert bool(flags_of(blob) & FLAG_ZLIB) == compress
    regions = {
        "magic": range(0, len(MAGIC)),
        "flags": range(len(MAGIC), len(MAGIC) + 1),
        "key id": range(len(MAGIC) + 1, len(MAGIC) + 1 + KEY_ID_BYTES),
        "nonce": range(len(MAGIC) + 1 + KEY_ID_BYTES, HEADER_BYTES),
        "ciphertext": range(HEADER_BYTES, len(blob) - TAG_BYTES),
        "tag": range(len(blob) - TAG_BYTES, len(blob)),
    }
    assert sum(len(r) for r in regions.values()) == len(blob)
    for region, positions in regions.items():
        assert len(positions) > 0, region
        for i in positions:
            for bit in (0x01, 0x80):
                damaged = bytearray(blob)
                damaged[i] ^= bit
                with pytest.raises(DecryptError):
                    keys.open(bytes(damaged), CONTEXT)
    assert keys.open(blob, CONTEXT) == data  # the original still opens


def test_truncated_or_extended_blob_is_refused() -> None:
    keys = ring()
    blob = keys.seal(b"abc" * 30, CONTEXT)
    for length in range(len(blob)):
        with pytest.raises(DecryptError):
            keys.open(blob[:length], CONTEXT)
    with pytest.raises(DecryptError):
        keys.open(blob + b"\0", CONTEXT)
    with pytest.raises(DecryptError, match="not a wadaemon blob"):
        keys.open(blob[: HEADER_BYTES - 1], CONTEXT)


def test_blob_sealed_with_an_unknown_key_names_it() -> None:
    lost = new_key("lost key")
    blob = Keyring(lost).seal(b"data", CONTEXT)
    keys = ring()
    with pytest.raises(DecryptError) as info:
        keys.open(blob, CONTEXT)
    message = str(info.value)
    assert f"sealed with key {lost.key_id}" in message
    assert "not in the keyring" in message
    assert keys.current.key_id in message  # says what the keyring does hold
    assert "encryption.old_key_files" in message
    assert blob_key_id(blob) == lost.key_id


def test_rotation_reads_old_blobs_and_seals_with_the_new_key() -> None:
    old, new = new_key("old"), new_key("new")
    before = Keyring(old).seal(COMPRESSIBLE, CONTEXT)

    rotated = Keyring(new, [old])
    assert rotated.open(before, CONTEXT) == COMPRESSIBLE
    assert rotated.key_for(before) is old
    after = rotated.seal(b"new generation", CONTEXT)
    assert blob_key_id(after) == new.key_id
    assert rotated.key_for(after) is new
    assert rotated.open(after, CONTEXT) == b"new generation"
    assert old.key_id in rotated.describe() and new.key_id in rotated.describe()

    with pytest.raises(DecryptError, match=old.key_id):
        Keyring(new).open(before, CONTEXT)  # the old key is needed for old blobs
    with pytest.raises(DecryptError, match=new.key_id):
        Keyring(old).open(after, CONTEXT)


def test_same_key_twice_in_the_keyring_is_harmless() -> None:
    key = new_key()
    keys = Keyring(key, [key])
    assert list(keys.by_id) == [key.key_id]
    assert keys.open(keys.seal(b"x", CONTEXT), CONTEXT) == b"x"


def test_decompression_bomb_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    keys = ring()
    limit = 4096
    at_limit = keys.seal(b"\0" * limit, CONTEXT)
    bomb = keys.seal(b"\0" * (limit * 100), CONTEXT)
    assert flags_of(bomb) & FLAG_ZLIB
    assert len(bomb) < limit  # small on disk, large once inflated
    monkeypatch.setattr(keyring_module, "MAX_PLAINTEXT", limit)
    assert keys.open(at_limit, CONTEXT) == b"\0" * limit
    with pytest.raises(DecryptError, match="more than the allowed size"):
        keys.open(bomb, CONTEXT)
    with pytest.raises(DecryptError, match="more than the allowed size"):
        keys.open(keys.seal(b"\0" * (limit + 1), CONTEXT), CONTEXT)


# --- key ids, piece ids, digests ----------------------------------------------------------------


def test_key_derivation_is_deterministic_and_keys_are_independent() -> None:
    master = os.urandom(32)
    a1, a2 = Key.from_bytes(master, "a"), Key.from_bytes(master, "a again")
    b = new_key()
    assert a1.key_id == a2.key_id
    assert re.fullmatch(r"[0-9a-f]{16}", a1.key_id)
    assert a1.key_id != b.key_id
    assert a1.key_id not in master.hex()  # the public id is not part of the secret
    # a blob sealed by one instance opens with another instance of the same master key
    assert Keyring(a2).open(Keyring(a1).seal(b"data", CONTEXT), CONTEXT) == b"data"
    with pytest.raises(ValueError):
        Key.from_bytes(os.urandom(31), "short")


def test_piece_ids_are_keyed_and_reveal_nothing() -> None:
    data = b"\x00SQLite format 3\x00" + os.urandom(1000)
    a, b = new_key(), new_key()
    piece = a.piece_id(data)
    assert re.fullmatch(r"[0-9a-f]{64}", piece)
    assert piece == a.piece_id(data) == a.piece_id(memoryview(data))  # stable: dedup works
    assert piece != b.piece_id(data)  # another key gives another id
    assert piece != a.piece_id(data + b"\0")
    plain = {
        hashlib.sha256(data).hexdigest(),
        hashlib.sha256(b"").hexdigest(),
        hashlib.sha3_256(data).hexdigest(),
        hashlib.blake2s(data).hexdigest(),
    }
    assert piece not in plain
    assert a.piece_id(b"") != hashlib.sha256(b"").hexdigest()
    # digests use their own subkey: a digest never equals a piece id of the same data
    assert a.digest(data) != piece
    assert a.digest(data) == a.digest(data) != b.digest(data)
    assert a.digest(data) != hashlib.sha256(data).hexdigest()


# --- key files ----------------------------------------------------------------------------------


def test_read_key_file_accepts_surrounding_whitespace_and_uppercase(tmp_path: Path) -> None:
    master = os.urandom(32)
    path = tmp_path / "session.key"
    path.write_text("  " + master.hex().upper()[:32] + "\n" + master.hex()[32:] + "\r\n\n")
    path.chmod(0o600)
    key = read_key_file(path, "encryption.key_file")
    assert key.key_id == Key.from_bytes(master, "x").key_id
    assert key.source == str(path)


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_owner_only_key_file_is_accepted(tmp_path: Path, mode: int) -> None:
    expected = write_key(tmp_path / "session.key", mode=mode)
    assert read_key_file(tmp_path / "session.key", "encryption.key_file").key_id == expected.key_id


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o601, 0o610, 0o777])
def test_key_file_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "session.key"
    write_key(path, mode=mode)
    with pytest.raises(ConfigError) as info:
        read_key_file(path, "encryption.key_file")
    message = str(info.value)
    assert f"mode {mode:04o}" in message
    assert f"chmod 600 {path}" in message
    assert "encryption.key_file" in message
    assert info.value.exit_code == 78


def test_key_file_that_is_a_directory_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "session.key"
    path.mkdir(mode=0o700)
    with pytest.raises(ConfigError, match="not a regular file"):
        read_key_file(path, "encryption.key_file")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "found 0 characters"),
        ("ab" * 31, "found 62 characters"),
        ("ab" * 33, "found 66 characters"),
        ("0x" + "ab" * 31, "not hexadecimal"),
        ("z" * 64, "not hexadecimal"),
    ],
    ids=["empty", "short", "long", "0x-prefix", "not-hex"],
)
def test_malformed_key_file_is_refused(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "session.key"
    path.write_text(text + "\n")
    path.chmod(0o600)
    with pytest.raises(ConfigError) as info:
        read_key_file(path, "encryption.key_file")
    message = str(info.value)
    assert expected in message
    assert str(path) in message
    assert "wadaemon keygen" in message


def test_load_keyring_with_old_keys(tmp_path: Path) -> None:
    current = write_key(tmp_path / "new.key")
    old = write_key(tmp_path / "old.key")
    keys = load_keyring(tmp_path / "new.key", [tmp_path / "old.key"], environ={})
    assert keys.current.key_id == current.key_id
    assert set(keys.by_id) == {current.key_id, old.key_id}
    before = Keyring(old).seal(b"old generation", CONTEXT)
    assert keys.open(before, CONTEXT) == b"old generation"
    with pytest.raises(ConfigError, match=r"encryption\.old_key_files"):
        load_keyring(tmp_path / "new.key", [tmp_path / "missing.key"], environ={})


def test_systemd_credential_wins_over_key_file(tmp_path: Path) -> None:
    file_key = write_key(tmp_path / "session.key")
    creds = tmp_path / "credentials"
    creds.mkdir()
    cred_key = write_key(creds / "session-key", mode=0o400)
    environ = {"CREDENTIALS_DIRECTORY": str(creds)}

    keys = load_keyring(tmp_path / "session.key", [], environ=environ)
    assert keys.current.key_id == cred_key.key_id != file_key.key_id
    assert keys.current.source == str(creds / "session-key")
    # the credential is enough: the key file need not exist
    keys = load_keyring(tmp_path / "absent.key", [], environ=environ)
    assert keys.current.key_id == cred_key.key_id
    # the credential goes through the same checks as a key file
    (creds / "session-key").chmod(0o644)
    with pytest.raises(ConfigError, match="systemd credential session-key"):
        load_keyring(tmp_path / "session.key", [], environ=environ)


def test_key_file_is_used_when_the_credential_is_absent(tmp_path: Path) -> None:
    file_key = write_key(tmp_path / "session.key")
    creds = tmp_path / "credentials"
    creds.mkdir()
    for environ in ({"CREDENTIALS_DIRECTORY": str(creds)}, {"CREDENTIALS_DIRECTORY": ""}, {}):
        keys = load_keyring(tmp_path / "session.key", [], environ=environ)
        assert keys.current.key_id == file_key.key_id


def test_load_keyring_reads_os_environ_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_key(tmp_path / "session.key")
    creds = tmp_path / "credentials"
    creds.mkdir()
    cred_key = write_key(creds / "session-key")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    assert load_keyring(tmp_path / "session.key", []).current.key_id == cred_key.key_id


# --- wadaemon keygen ----------------------------------------------------------------------------


def keygen(path: Path, umask: int = 0o022) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "CREDENTIALS_DIRECTORY"}
    return subprocess.run(
        [sys.executable, "-m", "wadaemon", "keygen", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        umask=umask,
    )


@pytest.mark.parametrize(
    "umask", [0o022, 0o000, 0o077, 0o277], ids=["022", "000", "077", "277-no-owner-write"]
)
def test_keygen_writes_an_owner_only_key(tmp_path: Path, umask: int) -> None:
    path = tmp_path / "session.key"
    proc = keygen(path, umask)
    assert proc.returncode == 0, proc.stderr
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text(encoding="ascii")
    assert re.fullmatch(r"[0-9a-f]{64}\n", text)
    key_id = Key.from_bytes(bytes.fromhex(text), "x").key_id
    assert f"key id {key_id}" in proc.stdout
    assert str(path) in proc.stdout
    # the file is usable as it is
    assert load_keyring(path, [], environ={}).current.key_id == key_id


def test_keygen_makes_a_new_key_every_time(tmp_path: Path) -> None:
    keys = {write_new_key(tmp_path / f"{i}.key").key_id for i in range(20)}
    texts = {(tmp_path / f"{i}.key").read_text() for i in range(20)}
    assert len(keys) == len(texts) == 20


def test_keygen_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "session.key"
    original = write_key(path)
    before = path.read_bytes()
    proc = keygen(path)
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert "refusing to overwrite" in proc.stderr
    assert str(path) in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert path.read_bytes() == before
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_key_file(path, "encryption.key_file").key_id == original.key_id


def test_keygen_does_not_follow_a_symlink(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.key"
    link = tmp_path / "session.key"
    link.symlink_to(target)
    proc = keygen(link)
    assert proc.returncode == 1
    assert "refusing to overwrite" in proc.stderr
    assert not target.exists()
    assert link.is_symlink()


def test_keygen_reports_a_missing_directory(tmp_path: Path) -> None:
    path = tmp_path / "no-such-dir" / "session.key"
    proc = keygen(path)
    assert proc.returncode == 1
    assert "cannot create the key file" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not path.parent.exists()


def test_systemd_credential_mode_is_systemds_business(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """systemd 257 hands credentials over as root-owned 0440 files readable through an ACL."""
    from wadaemon.keyring import load_keyring

    creds = tmp_path / "credentials"
    creds.mkdir()
    key = creds / "session-key"
    key.write_text("ab" * 32 + "\n")
    key.chmod(0o440)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    ring = load_keyring(tmp_path / "unused.key", [], environ={"CREDENTIALS_DIRECTORY": str(creds)})
    assert str(key) in ring.describe()
    outside = tmp_path / "outside.key"
    outside.write_text("ab" * 32 + "\n")
    outside.chmod(0o440)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_keyring(outside, [], environ={})
