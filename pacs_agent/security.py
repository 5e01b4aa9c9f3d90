"""Credentials: Argon2id password hashes (argon2-cffi), random bearer tokens and session ids of
which only the SHA-256 is stored, and constant-time comparison everywhere a secret is compared.

Roles, from least to most: ``viewer`` (read), ``operator`` (retry, re-run, force complete,
suspend; read all), ``admin`` (everything). ``service`` is the role of the static service token
(``PACS_AGENT_API_TOKEN``) of workers and scripts.
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
# The static service token (PACS_AGENT_API_TOKEN) of workers and scripts: it may read what a
# viewer may, fetch instances and send by STOW-RS; it changes nothing an admin configures.
SERVICE_ROLE = "service"
# The service routes (instance download with the patient's data, STOW-RS which adds studies)
# are also open to users who may act: operators and admins, not read-only viewers.
SERVICE_USER_ROLE = "operator"

MIN_PASSWORD = 8
MAX_PASSWORD = 1024  # longer input is refused before hashing (Argon2 time is per byte too)

_hasher = PasswordHasher()  # Argon2id with the library's current recommended parameters
# Verified when a user name is unknown or has no password, so that a refusal takes as long as
# a wrong password (no user enumeration by timing).
_DUMMY_HASH = _hasher.hash(secrets.token_urlsafe(16))


def hash_password(password: str) -> str:
    """The Argon2id hash of ``password`` (ValueError when it is too short or too long)."""
    if len(password) < MIN_PASSWORD:
        raise ValueError(f"a password needs at least {MIN_PASSWORD} characters")
    if len(password) > MAX_PASSWORD:
        raise ValueError(f"a password may have at most {MAX_PASSWORD} characters")
    return _hasher.hash(password)


def verify_password(stored_hash: str | None, password: str) -> bool:
    """Whether ``password`` matches ``stored_hash``; always spends one Argon2 verification."""
    if len(password) > MAX_PASSWORD:
        password = password[:MAX_PASSWORD]
        stored_hash = None  # still spend the time; never true
    try:
        ok = _hasher.verify(stored_hash or _DUMMY_HASH, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False
    return ok and stored_hash is not None


def needs_rehash(stored_hash: str) -> bool:
    """Whether a stored hash was made with older parameters than the library's current ones."""
    try:
        return _hasher.check_needs_rehash(stored_hash)
    except (InvalidHashError, ValueError):
        return True


def new_secret(nbytes: int = 32) -> str:
    return secrets.token_urlsafe(nbytes)


def sha256_hex(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8")).hexdigest()


def same(a: str | None, b: str | None) -> bool:
    """Constant-time equality of two secrets (False when either is missing).

    The digests are compared, not the strings, so that neither the content nor the length of
    the expected secret shows in the time taken.
    """
    if not a or not b:
        return False
    return hmac.compare_digest(
        hashlib.sha256(a.encode("utf-8")).digest(), hashlib.sha256(b.encode("utf-8")).digest()
    )


def role_allows(role: str, needed: str) -> bool:
    """Whether ``role`` may do what ``needed`` may.

    The service token: what viewers may, plus the service routes. The service routes: the
    service token, operators and admins.
    """
    if role == SERVICE_ROLE:
        return needed in (SERVICE_ROLE, "viewer")
    if needed == SERVICE_ROLE:
        needed = SERVICE_USER_ROLE
    return ROLE_RANK.get(role, 0) >= ROLE_RANK.get(needed, 99)
