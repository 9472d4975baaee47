"""Integration secrets at rest: Fernet tokens, MultiFernet for key rotation.

Keys come from `RRC_SECRET_KEYS` (comma-separated; the first encrypts, all decrypt, so a new key
is put in front and the old one kept until every token was re-encrypted with `rotate`). On the
embedded SQLite default with no key configured, one is generated once into <data dir>/secret.key
(mode 0600), so a newcomer's `streamlit run app.py` works and secrets are still never stored in
clear. A server database without a configured key is refused rather than silently given a local
key file that other app instances would not share.

The same keys also give MAC keys (`mac_keys`): for each Fernet key, HKDF-SHA256 derives a separate
32-byte key per purpose (the audit log's chain head seal uses one), so no Fernet key is ever used
directly as an HMAC key, and rotating RRC_SECRET_KEYS rotates them too (the first writes, all verify).

Nothing here logs, and exception messages never contain a secret or a token.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import stat
import tempfile
from functools import cache
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from db.session import data_dir, is_embedded

KEY_FILE = "secret.key"
KNOWN_PREFIXES = ("sk_test_", "sk_live_", "rk_test_", "rk_live_", "pk_test_", "pk_live_", "whsec_", "pat-")


class SecretKeyMissing(RuntimeError):
    """No usable key: none configured for a server database, or none of the keys opens a token."""


def _create_key_file(path: Path) -> None:
    """Write a new key with 0600 from the first byte, atomically (two processes may race here)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".secret-")  # mkstemp creates with 0600
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(Fernet.generate_key())
        with contextlib.suppress(FileExistsError):  # another process won the race: its key is used
            os.link(tmp, path)
    finally:
        os.unlink(tmp)


def _key_file_key(folder: Path, name: str = KEY_FILE) -> bytes:
    path = folder / name
    if not path.exists():
        _create_key_file(path)
    if stat.S_IMODE(path.stat().st_mode) & 0o077:
        os.chmod(path, 0o600)  # a copied or restored key file must not stay group/world readable
    return path.read_bytes().strip()


@cache
def _fernet(keys: str | None, folder: Path) -> MultiFernet:
    if keys:
        try:
            return MultiFernet([Fernet(k.strip().encode()) for k in keys.split(",") if k.strip()])
        except ValueError:
            raise SecretKeyMissing("RRC_SECRET_KEYS: every key must be a Fernet key (Fernet.generate_key())") from None
    return MultiFernet([Fernet(_key_file_key(folder))])


def _configured() -> tuple[str | None, Path]:
    keys = os.environ.get("RRC_SECRET_KEYS", "").strip() or None
    if not keys and not is_embedded():
        raise SecretKeyMissing("RRC_SECRET_KEYS must be set when DATABASE_URL is not the embedded SQLite")
    return keys, data_dir().resolve()


def fernet() -> MultiFernet:
    """The keys in force now (re-read from the environment on every call, so rotation needs no restart)."""
    return _fernet(*_configured())


@cache
def _mac_keys(keys: str | None, folder: Path, purpose: bytes) -> tuple[bytes, ...]:
    encoded = [k.strip().encode() for k in keys.split(",") if k.strip()] if keys else [_key_file_key(folder)]
    derived = []
    for key in encoded:
        try:
            material = base64.urlsafe_b64decode(key)
        except (binascii.Error, ValueError):
            material = b""
        if len(material) != 32:
            raise SecretKeyMissing("RRC_SECRET_KEYS: every key must be a Fernet key (Fernet.generate_key())")
        derived.append(HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"rrc-mac-key/" + purpose)
                       .derive(material))
    return tuple(derived)


def mac_keys(purpose: str) -> tuple[bytes, ...]:
    """HMAC keys for `purpose`, one per configured secret key, the primary first (write with the
    first, accept any). Derived with HKDF, so they are independent of the Fernet keys and of the
    keys of any other purpose."""
    keys, folder = _configured()
    return _mac_keys(keys, folder, purpose.encode())


def local_key(name: str) -> str:
    """A random key kept in <data dir>/<name> (0600), created on first use: the embedded default
    for keys that must survive restarts but need no rotation, such as the sign-in cookie key."""
    folder = data_dir().resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return _key_file_key(folder, name).decode()


def generate_key() -> str:
    """A new key for RRC_SECRET_KEYS (CLI helper; printed once, never stored by us)."""
    return Fernet.generate_key().decode()


def encrypt_json(data: dict[str, Any]) -> str:
    """A Fernet token (str) of the JSON of `data`: what `integrations.config_encrypted` stores."""
    return fernet().encrypt(json.dumps(data, sort_keys=True).encode()).decode()


def decrypt_json(token: str) -> dict[str, Any]:
    try:
        data = json.loads(fernet().decrypt(token.encode()))
    except InvalidToken:
        raise SecretKeyMissing("cannot decrypt an integration secret: none of the configured keys match") from None
    if not isinstance(data, dict):
        raise SecretKeyMissing("an integration secret decrypted to something other than a JSON object")
    return data


def rotate(token: str) -> str:
    """Re-encrypt with the primary key (after adding a new key in front of RRC_SECRET_KEYS)."""
    try:
        return fernet().rotate(token.encode()).decode()
    except InvalidToken:
        raise SecretKeyMissing("cannot rotate an integration secret: none of the configured keys match") from None


def mask_secret(secret: str | None, keep: int = 4) -> str:
    """`sk_test_abcd1234` -> `sk_test_…1234`: enough to recognise a key, never enough to use it.

    The last `keep` characters are shown only when the part after a known prefix is at least
    `2 * keep` long, so a short value is never half revealed.
    """
    if not secret:
        return ""
    prefix = next((known for known in KNOWN_PREFIXES if secret.startswith(known)), "")
    tail = secret[-keep:] if len(secret) - len(prefix) >= keep * 2 else ""
    return f"{prefix}…{tail}"
