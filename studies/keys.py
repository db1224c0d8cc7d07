"""API keys: shown once at creation, stored only as HMAC-SHA256(salt, secret) with a per-key random salt."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from typing import Optional, Sequence

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from .db import read_only, utcnow
from .models import ApiKey

__all__ = ["OWNER_PATTERN", "validate_owner", "create_key", "verify_key", "key_id_of", "revoke_key",
           "list_keys"]

OWNER_PATTERN = re.compile(r"^[A-Za-z0-9._@-]{1,64}$")
_KEY_PATTERN = re.compile(r"^s3s_([0-9a-f]{12})_([A-Za-z0-9_-]{20,100})$")
_ID_PATTERN = re.compile(r"^[0-9a-f]{12}$")


def validate_owner(owner: str) -> str:
    if not isinstance(owner, str) or not OWNER_PATTERN.match(owner):
        raise ValueError(f"owner={owner!r} must be 1-64 characters of letters, digits and . _ @ -")
    return owner


def _digest(salt: str, secret: str) -> str:
    return hmac.new(bytes.fromhex(salt), secret.encode(), hashlib.sha256).hexdigest()


def create_key(session: Session, owner: str, label: str = "") -> tuple[ApiKey, str]:
    """Returns (row, plaintext key). The plaintext exists only in the return value."""
    validate_owner(owner)
    if len(label) > 200:
        raise ValueError("label must be at most 200 characters")
    key_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    salt = secrets.token_hex(16)
    row = ApiKey(id=key_id, owner=owner, label=label, salt=salt, digest=_digest(salt, secret), created_at=utcnow())
    session.add(row)
    session.commit()
    return row, f"s3s_{key_id}_{secret}"


def verify_key(session: Session, plaintext: Optional[str]) -> Optional[ApiKey]:
    """The key's row when the key is valid and not revoked, else None (no hint which part was wrong)."""
    m = _KEY_PATTERN.match(plaintext or "")
    if not m:
        return None
    row = read_only(session).get(ApiKey, m.group(1), populate_existing=True)
    session.commit()     # end the read (SQLite transactions hold the write lock)
    if row is None or row.revoked_at is not None:
        return None
    if not hmac.compare_digest(row.digest, _digest(row.salt, m.group(2))):
        return None
    return row


def key_id_of(key_or_id: str) -> Optional[str]:
    """The key id (12 hex digits) of a key id or of a whole key `s3s_<id>_<secret>`; None for anything else.

    Callers print the id, never what they were given: that may be the whole key."""
    if key_or_id.startswith("s3s_"):
        key_or_id = key_or_id.split("_")[1]
    return key_or_id if _ID_PATTERN.match(key_or_id) else None


def revoke_key(session: Session, key_or_id: str) -> bool:
    key_id = key_id_of(key_or_id)
    if key_id is None:
        return False
    res = session.execute(update(ApiKey).where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None))
                          .values(revoked_at=utcnow()))
    session.commit()
    return res.rowcount == 1


def list_keys(session: Session, owner: Optional[str] = None) -> Sequence[ApiKey]:
    q = select(ApiKey).order_by(ApiKey.created_at)
    if owner is not None:
        q = q.where(ApiKey.owner == owner)
    rows = session.scalars(q).all()
    session.commit()
    return rows
