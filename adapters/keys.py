"""API keys: generation, hashing, parsing and constant-time comparison.

Boundary: pure functions over strings; storing keys is the registry's job. Format:
`lf_<key_id>_<secret>`, key_id = 8 hex digits (public, shown in listings), secret = 32 URL-safe
characters. Only `hash_key(plaintext)` is ever stored.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

__all__ = ["KEY_PREFIX", "generate_key", "hash_key", "key_id_of", "keys_match"]

KEY_PREFIX = "lf"
_KEY_PATTERN = re.compile(r"^lf_([0-9a-f]{8})_([A-Za-z0-9_-]{32})$")


def generate_key() -> tuple[str, str]:
    """Return `(plaintext, key_id)` for a fresh key. The plaintext is shown once, then dropped."""
    key_id = secrets.token_hex(4)
    secret = secrets.token_urlsafe(24)  # 24 random bytes -> exactly 32 URL-safe characters
    return f"{KEY_PREFIX}_{key_id}_{secret}", key_id


def hash_key(plaintext: str) -> str:
    """sha256 hex of the key.

    A slow KDF (bcrypt, argon2) exists to slow down guessing *low-entropy* passwords from a stolen
    hash. Our secrets are 192 random bits: brute force is out of reach even at sha256 speed, and a
    fast hash lets the ingress authenticate every request with one lookup by hash.
    """
    return hashlib.sha256(plaintext.encode("utf-8")).hexdigest()


def key_id_of(plaintext: str) -> str | None:
    """The key id embedded in a key, or None when the string is not a well-formed key."""
    match = _KEY_PATTERN.fullmatch(plaintext)
    return match.group(1) if match else None


def keys_match(a_hash: str, b_hash: str) -> bool:
    """Compare two key hashes in constant time (no timing side channel on the prefix)."""
    return hmac.compare_digest(a_hash.encode("ascii", "replace"), b_hash.encode("ascii", "replace"))
