"""Credentials: Argon2id password hashes (argon2-cffi), random bearer tokens and session ids of
which only the SHA-256 is stored, and constant-time comparison everywhere a secret is compared.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

ROLES = ("viewer", "operator", "admin")
# What each role may do includes everything of the roles before it.
ROLE_RANK = {"viewer": 1, "operator": 2, "admin": 3}
# The static service token (PACS_AGENT_API_TOKEN) of workers and scripts: it may fetch instances
# and send by STOW-RS, and read; it changes nothing an admin configures.
SERVICE_ROLE = "service"

_hasher = PasswordHasher()  # Argon2id with the library's current recommended parameters
# Verified when a user name is unknown, so that a login takes as long either way.
_DUMMY_HASH = _hasher.hash(secrets.token_urlsafe(16))


def hash_password(password: str) -> str:
    if len(password) < 8:
        raise ValueError("a password needs at least 8 characters")
    return _hasher.hash(password)


def verify_password(stored_hash: str | None, password: str) -> bool:
    try:
        return _hasher.verify(stored_hash or _DUMMY_HASH, password) and stored_hash is not None
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def new_secret(nbytes: int = 32) -> str:
    return secrets.token_urlsafe(nbytes)


def sha256_hex(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8")).hexdigest()


def same(a: str | None, b: str | None) -> bool:
    """Constant-time equality of two secrets (False when either is missing)."""
    if not a or not b:
        return False
    return hmac.compare_digest(a.encode("utf-8"), b.encode("utf-8"))


def role_allows(role: str, needed: str) -> bool:
    """Whether ``role`` may do what ``needed`` may (service: only what viewers may, plus the
    service routes that ask for it by name)."""
    if role == SERVICE_ROLE:
        return needed in (SERVICE_ROLE, "viewer")
    if needed == SERVICE_ROLE:
        return role in ROLE_RANK
    return ROLE_RANK.get(role, 0) >= ROLE_RANK.get(needed, 99)
