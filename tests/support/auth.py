"""Users and tokens for tests: made directly in the database, as `pacs-agent users` makes them."""

from __future__ import annotations

from pacs_agent.db.models import ApiToken, User
from pacs_agent.db.session import Database
from pacs_agent.security import hash_password, new_secret, sha256_hex


def make_user(database_url: str, name: str, role: str, password: str | None = None) -> str:
    """Create (or reuse) a user with ``role`` and return a new bearer token for it."""
    db = Database(database_url)
    try:
        token = new_secret()
        with db.session() as s:
            user = s.query(User).filter_by(name=name).one_or_none()
            if user is None:
                user = User(
                    name=name,
                    role=role,
                    password_hash=hash_password(password) if password else None,
                )
                s.add(user)
                s.flush()
            s.add(ApiToken(user_id=user.id, token_sha256=sha256_hex(token), prefix=token[:8]))
        return token
    finally:
        db.dispose()


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}
