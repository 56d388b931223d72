"""The sidecar's copy of authsvc's JWKS: fetched at start, refreshed
periodically and on an unknown ``kid``, never more often than a floor allows.

Private to :mod:`authsvc_client.sidecar`. Runs on the sidecar's event loop; the
hot path only reads :attr:`KeySet.keys`, which is replaced whole, never mutated.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from authsvc_client._tokens import parse_jwks

log = logging.getLogger("authsvc_client.sidecar")

Fetch = Callable[[], Awaitable[Any]]  # -> GetJwksResponse


class KeySet:
    """Public keys by ``kid``.

    Args:
        fetch: calls GetJwks (raising on failure).
        refresh_floor: at least this many seconds between two fetches caused by
            unknown key ids, so a flood of tokens with made-up ``kid`` values
            costs authsvc one GetJwks per floor, not one per token.
    """

    def __init__(self, fetch: Fetch, *, refresh_floor: float) -> None:
        self._fetch = fetch
        self._floor = refresh_floor
        self.keys: Mapping[str, Ed25519PublicKey] = {}
        self._last_attempt = -math.inf
        self._last_failed = False
        self._inflight: asyncio.Task[None] | None = None
        #: GetJwks calls made, by what caused them ("start", "interval",
        #: "unknown_kid"): read by the sidecar's metrics.
        self.fetches: dict[str, int] = {"start": 0, "interval": 0, "unknown_kid": 0}

    async def refresh(self, cause: str = "interval") -> None:
        """Fetches the set now (joining a fetch already under way).

        Raises:
            Whatever ``fetch`` raises; the keys held so far stay in use.
        """
        if self._inflight is None:
            self.fetches[cause] = self.fetches.get(cause, 0) + 1
            self._inflight = asyncio.create_task(self._refresh())
            # Retrieved here so a failure nobody awaits any more is not reported
            # as "never retrieved"; the waiters get it through the shield.
            self._inflight.add_done_callback(_consume)
        task = self._inflight
        # Shielded: one caller giving up (its RPC was cancelled) must not
        # cancel the fetch the others wait on.
        await asyncio.shield(task)

    async def _refresh(self) -> None:
        self._last_attempt = time.monotonic()
        try:
            response = await self._fetch()
        except BaseException:
            self._last_failed = True
            raise
        finally:
            self._inflight = None
        self._last_failed = False
        keys = parse_jwks(response.keys)
        if keys:
            self.keys = keys
        else:
            log.warning("authsvc.sidecar.jwks_empty")

    async def refresh_for(self, kid: str) -> bool | None:
        """Refetches after a token named an unknown ``kid``, floor permitting.

        Returns:
            True if the kid is known now; False if it is not (the set was
            fetched, or fetched too recently to fetch again); None if authsvc
            could not be asked (the last fetch failed).
        """
        if kid in self.keys:
            return True
        if self._inflight is None and time.monotonic() - self._last_attempt < self._floor:
            return None if self._last_failed else False
        try:
            await self.refresh("unknown_kid")
        except asyncio.CancelledError:
            raise
        except Exception:
            log.warning("authsvc.sidecar.jwks_fetch_failed", exc_info=True)
            return None
        return kid in self.keys


def _consume(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        task.exception()
