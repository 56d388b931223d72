"""The metrics port: what the services and the hasher report, and nothing of how.

Services depend on :class:`Metrics` only; ``authsvc.metrics`` implements it on
a prometheus-client registry, and :class:`NoMetrics` is what they get when
metrics are off (every method a no-op). Every argument is one value of a fixed
set below, never anything from a request: a label can never carry a user id,
an email, a token or an org id.
"""

from __future__ import annotations

from typing import Protocol

from authsvc.errors import AuthError

#: How a SignUp or SignInWithPassword ended. ``challenge`` is a sign-in that
#: answered a challenge (none does yet; the series exists so that dashboards
#: need no change when one does).
OUTCOMES = (
    "success",
    "challenge",
    "invalid_credentials",
    "invalid_argument",
    "rate_limited",
    "email_exists",
    "signup_disabled",
    "unavailable",
    "error",
)
#: What a refresh-token exchange did: a rotation, a grace re-issue of the
#: current token (two tabs refreshing at once), or a reuse detection.
REFRESH_RESULTS = ("rotated", "grace", "reused")
#: Rate limits by kind (AUTHSVC_SIGNIN_ATTEMPTS_PER_IP, _PER_EMAIL).
LIMIT_KINDS = ("ip", "email")
#: Authenticate: answered from the cache, resolved (not cached, or no longer
#: valid there), or resolved because the cache is bypassed (bus unhealthy).
CACHE_RESULTS = ("hit", "miss", "bypass")
#: Password-hasher operations (a dummy verify for an unknown email is a verify).
HASH_OPS = ("hash", "verify")

_OUTCOME_OF_REASON = {
    "INVALID_CREDENTIALS": "invalid_credentials",
    "INVALID_ARGUMENT": "invalid_argument",
    "WEAK_PASSWORD": "invalid_argument",
    "RATE_LIMITED": "rate_limited",
    "EMAIL_ALREADY_EXISTS": "email_exists",
    "SIGNUP_DISABLED": "signup_disabled",
    "BACKEND_UNAVAILABLE": "unavailable",
}


def outcome(error: Exception) -> str:
    """The outcome (one of ``OUTCOMES``) of a sign-up or sign-in that raised."""
    if isinstance(error, AuthError):
        return _OUTCOME_OF_REASON.get(error.reason, "error")
    return "error"


class Metrics(Protocol):
    def sign_up(self, outcome: str) -> None:
        """One SignUp ended with ``outcome`` (of ``OUTCOMES``)."""

    def sign_in(self, outcome: str) -> None:
        """One SignInWithPassword ended with ``outcome`` (of ``OUTCOMES``)."""

    def refresh(self, result: str) -> None:
        """One refresh-token exchange did ``result`` (of ``REFRESH_RESULTS``)."""

    def rate_limited(self, kind: str) -> None:
        """An attempt was refused by the ``kind`` limit (of ``LIMIT_KINDS``)."""

    def authenticate_cache(self, result: str) -> None:
        """One Authenticate resolution went ``result`` (of ``CACHE_RESULTS``)."""

    def password_hash(self, op: str, wait: float, duration: float) -> None:
        """One hasher ``op`` waited ``wait`` s for a thread, then took ``duration`` s.

        Called from the hasher's thread.
        """


class NoMetrics:
    """Metrics off: nothing is counted."""

    def sign_up(self, outcome: str) -> None:
        return None

    def sign_in(self, outcome: str) -> None:
        return None

    def refresh(self, result: str) -> None:
        return None

    def rate_limited(self, kind: str) -> None:
        return None

    def authenticate_cache(self, result: str) -> None:
        return None

    def password_hash(self, op: str, wait: float, duration: float) -> None:
        return None
