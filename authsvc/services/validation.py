"""Input rules shared by the services. Each failure names the field."""

from __future__ import annotations

import re
import unicodedata
import uuid

from email_validator import EmailNotValidError, validate_email

from authsvc.domain import etags
from authsvc.domain.models import MAX_SLUG
from authsvc.errors import InvalidArgument, WeakPassword

MAX_EMAIL = 254
MAX_DISPLAY_NAME = 200
MAX_USER_AGENT = 512
MAX_IP = 64
# The canonical text of a UUID (8-4-4-4-12 hex digits, any case). uuid.UUID()
# alone also takes braces, "urn:uuid:", no hyphens or moved ones, and (through
# int()) a sign and underscores: many spellings of one id.
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


def email(value: str, field: str = "email") -> tuple[str, str]:
    """Returns the normalized email and its case-insensitive uniqueness key."""
    if not value:
        raise InvalidArgument.field(field, "required")
    if len(value) > MAX_EMAIL:
        raise InvalidArgument.field(field, f"at most {MAX_EMAIL} characters")
    try:
        normalized = validate_email(value, check_deliverability=False).normalized
    except EmailNotValidError:
        raise InvalidArgument.field(field, "not a valid email address") from None
    return normalized, fold(normalized)


def email_key(value: str) -> str | None:
    """The uniqueness key of an email as typed at sign-in, or None if it cannot exist."""
    if not value or len(value) > MAX_EMAIL:
        return None
    try:
        return fold(validate_email(value, check_deliverability=False).normalized)
    except EmailNotValidError:
        return None


def fold(value: str) -> str:
    """The case-insensitive key of an email: NFKC case folding (Unicode's
    NFKC_Casefold), so every case spelling of an address maps to one key."""
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", value).casefold())


def password(value: str, min_length: int, max_length: int, field: str = "password") -> None:
    if not value:
        raise InvalidArgument.field(field, "required")
    if len(value) < min_length or len(value) > max_length:
        raise WeakPassword(f"password must be {min_length} to {max_length} characters")


def profile_name(value: str, field: str) -> str:
    """A display, given or family name: optional, at most 200 characters, one
    line of printable text (no control characters, C0, DEL or C1, and no line
    or paragraph separators); surrounding spaces are dropped. Format
    characters (a zero-width joiner, in scripts and emoji that need one) are
    text, not controls."""
    if len(value) > MAX_DISPLAY_NAME:
        raise InvalidArgument.field(field, f"at most {MAX_DISPLAY_NAME} characters")
    if any(unicodedata.category(ch) in _NOT_IN_A_NAME for ch in value):
        raise InvalidArgument.field(field, "control characters are not allowed")
    return value.strip()


# Cc: controls (C0, DEL, C1); Zl, Zp: line and paragraph separators.
_NOT_IN_A_NAME = frozenset({"Cc", "Zl", "Zp"})


def etag(value: str, field: str = "etag") -> str:
    """An etag from a request: "" (no check) or one to compare. Ours are
    short; anything longer than ``etags.MAX_LENGTH`` is bad input, not a
    mismatch."""
    if len(value) > etags.MAX_LENGTH:
        raise InvalidArgument.field(field, f"at most {etags.MAX_LENGTH} characters")
    return value


def user_id(value: str, field: str = "user_id") -> uuid.UUID:
    return uuid_field(value, field)


def uuid_field(value: str, field: str) -> uuid.UUID:
    """A UUID in its canonical text (any case); every other spelling is refused."""
    if not value:
        raise InvalidArgument.field(field, "required")
    if _UUID.fullmatch(value) is None:
        raise InvalidArgument.field(field, "not a UUID (8-4-4-4-12 hex digits)")
    return uuid.UUID(value)


def page_size(value: int, default: int = 50, maximum: int = 500) -> int:
    if value < 0:
        raise InvalidArgument.field("page_size", "must not be negative")
    return default if value == 0 else min(value, maximum)


MAX_ORG_NAME = 200
_SLUG = re.compile(rf"[a-z0-9-]{{3,{MAX_SLUG}}}")


def slug(value: str, field: str = "slug") -> str:
    """Lowercase letters, digits and hyphens, 3 to 63 of them. Not folded:
    "Acme" is refused rather than silently becoming "acme"."""
    if not value:
        raise InvalidArgument.field(field, "required")
    if _SLUG.fullmatch(value) is None:
        raise InvalidArgument.field(field, "3 to 63 lowercase letters, digits and hyphens")
    return value


def org_name(value: str, field: str = "name") -> str:
    value = value.strip()
    if not value:
        raise InvalidArgument.field(field, "required")
    if len(value) > MAX_ORG_NAME:
        raise InvalidArgument.field(field, f"at most {MAX_ORG_NAME} characters")
    if any(ord(ch) < 32 or 0x7F <= ord(ch) < 0xA0 for ch in value):
        raise InvalidArgument.field(field, "control characters are not allowed")
    return value


def org_ref(org_id: str, org_slug: str) -> uuid.UUID | str:
    """The org a request names in its ``org`` oneof: its id, or its slug (a
    oneof holds at most one of them; an empty one is as good as unset)."""
    assert not (org_id and org_slug), "the org oneof holds one field"
    if org_id:
        return uuid_field(org_id, "org_id")
    if org_slug:
        # Any string that cannot be a slug names no org; say so as bad input.
        return slug(org_slug, "org_slug")
    # Named by its first field: a BadRequest field is a path to a field, and
    # the oneof `org` is none; the description names both.
    raise InvalidArgument.field("org_id", "required: org_id or org_slug (the org oneof)")
