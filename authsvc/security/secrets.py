"""The server secret and what is derived from it.

``AUTHSVC_SECRET_KEY`` (or, on the embedded default, a key file created in the
data directory) is never used directly: each purpose gets its own subkey via
HKDF, so a page-token key can never verify a refresh token or unseal a key.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

_NONCE = 12


def load_or_create_secret(configured: str | None, data_dir: Path) -> bytes:
    """The master secret: the configured one, else ``<data_dir>/secret.key``.

    The configured value is any string of at least 32 characters (for example
    ``openssl rand -base64 48``). The key file is created with mode 0600.
    """
    if configured is not None:
        if len(configured) < 32:
            raise ValueError("AUTHSVC_SECRET_KEY must be at least 32 characters")
        return configured.encode()
    path = data_dir / "secret.key"
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(base64.urlsafe_b64encode(secrets.token_bytes(48)).decode())
    return path.read_text().strip().encode()


class Secrets:
    def __init__(self, master: bytes) -> None:
        self._master = master

    def subkey(self, purpose: str) -> bytes:
        return HKDF(
            algorithm=hashes.SHA256(), length=32, salt=None, info=b"authsvc/" + purpose.encode()
        ).derive(self._master)

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        nonce = os.urandom(_NONCE)
        return nonce + AESGCM(self.subkey("key-seal")).encrypt(nonce, plaintext, aad)

    def unseal(self, sealed: bytes, aad: bytes) -> bytes:
        return AESGCM(self.subkey("key-seal")).decrypt(sealed[:_NONCE], sealed[_NONCE:], aad)


def sha256(value: str) -> bytes:
    return hashlib.sha256(value.encode()).digest()


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode_canonical(text: str) -> bytes | None:
    """Decodes unpadded base64url, or None unless ``text`` is its one canonical spelling.

    Base64 has slack bits in its last character, so several strings decode to
    the same bytes; accepting only the canonical one makes every single-byte
    change of a token detectable.
    """
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (ValueError, TypeError):
        return None
    return data if b64url(data) == text else None
