"""Values sealed at rest: AES-256-GCM (`cryptography`'s AESGCM) under RUNYARD_SECRET_KEYS.

A sealed value is the text `ry1.<key id>.<base64url of nonce + ciphertext and tag>`:
- the key id is the first 8 bytes (hex) of the SHA-256 of the key, so opening picks the right
  key of the list and `runyard secrets reencrypt` sees what is sealed under an older one;
- the nonce is 12 random bytes, fresh for every seal;
- the associated data names what the value belongs to (`secret:<org id>:<name>`,
  `trigger:<id>`, ...): a ciphertext copied onto another row does not open (InvalidTag).

The first key of the list seals; every key of the list opens.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from app.config import current_config
from app.errors import Unavailable

PREFIX = "ry1."
NONCE_BYTES = 12
KEY_BYTES = 32
NO_KEY_HINT = (
    "set RUNYARD_SECRET_KEYS (the same list on the API and every worker) to one or more "
    "comma-separated keys, each the base64 of 32 random bytes, e.g. "
    '`python -c "import base64, os; print(base64.b64encode(os.urandom(32)).decode())"`; '
    "`runyard up` makes one in .runyard/secret-keys"
)


class KeyMissing(Unavailable):
    """No key to seal or open with: configuration, not the caller's fault (503)."""


def new_key() -> str:
    """A fresh key as RUNYARD_SECRET_KEYS takes it."""
    return base64.b64encode(os.urandom(KEY_BYTES)).decode()


def _decode_key(position: int, text: str) -> bytes:
    try:
        raw = base64.b64decode(text.replace("-", "+").replace("_", "/"), validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != KEY_BYTES:
        # Never the key itself in the message: it ends up in logs.
        raise KeyMissing(
            f"RUNYARD_SECRET_KEYS: key {position} is not the base64 of 32 bytes",
            hint=NO_KEY_HINT,
        )
    return raw


def key_id(key: bytes) -> str:
    return hashlib.sha256(key).digest()[:8].hex()


def is_sealed(value: str) -> bool:
    return value.startswith(PREFIX)


def sealed_key_id(value: str) -> str | None:
    """The id of the key a sealed value was sealed with (None for a value in clear)."""
    return value.split(".", 2)[1] if is_sealed(value) else None


@dataclass(frozen=True)
class Keyring:
    """The configured keys, in order: (id, cipher)."""

    keys: tuple[tuple[str, AESGCM], ...]

    @property
    def current_id(self) -> str:
        self._require()
        return self.keys[0][0]

    def _require(self) -> None:
        if not self.keys:
            raise KeyMissing("no secret key is configured (RUNYARD_SECRET_KEYS)", hint=NO_KEY_HINT)

    def seal(self, plaintext: str, context: str) -> str:
        self._require()
        kid, cipher = self.keys[0]
        nonce = os.urandom(NONCE_BYTES)
        sealed = cipher.encrypt(nonce, plaintext.encode("utf-8"), context.encode("utf-8"))
        return f"{PREFIX}{kid}.{base64.urlsafe_b64encode(nonce + sealed).decode()}"

    def open(self, value: str, context: str) -> str:
        """The plaintext of a sealed value; KeyMissing when no configured key opens it."""
        self._require()
        try:
            _, kid, payload = value.split(".", 2)
            raw = base64.urlsafe_b64decode(payload)
        except (ValueError, binascii.Error) as exc:
            raise KeyMissing(f"a sealed value of {context} is malformed") from exc
        cipher = next((cipher for known, cipher in self.keys if known == kid), None)
        if cipher is None:
            raise KeyMissing(
                f"{context} is sealed under key {kid}, which is not in RUNYARD_SECRET_KEYS",
                hint="put the old key back in RUNYARD_SECRET_KEYS, after the new one, then run "
                "`runyard secrets reencrypt`",
            )
        try:
            plain = cipher.decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], context.encode("utf-8"))
        except InvalidTag as exc:
            raise KeyMissing(
                f"the sealed value of {context} does not open: altered, or moved from another row",
                hint="set the value again",
            ) from exc
        return plain.decode("utf-8")


_rings: dict[tuple[str, ...], Keyring] = {}


def keyring() -> Keyring:
    """The keyring of this process's settings (built once per key list)."""
    texts = current_config().secret_keys
    ring = _rings.get(texts)
    if ring is None:
        keys = []
        for position, text in enumerate(texts, start=1):
            raw = _decode_key(position, text)
            keys.append((key_id(raw), AESGCM(raw)))
        ring = _rings[texts] = Keyring(tuple(keys))
    return ring


def readable(value: str, context: str) -> str:
    """A stored webhook or notification secret in clear: opened when sealed; a clear value
    left by the migration (no key was configured then) is taken as it is until
    `runyard secrets reencrypt` seals it."""
    return keyring().open(value, context) if is_sealed(value) else value
