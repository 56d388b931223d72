"""Argon2id password hashing, run off the event loop."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable
from concurrent.futures import Executor
from typing import TypeVar

import argon2
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from authsvc.domain.metrics import Metrics, NoMetrics

T = TypeVar("T")


class Argon2Hasher:
    """Argon2id via argon2-cffi in a thread pool.

    argon2-cffi releases the GIL while hashing, so a pool as large as the
    machine's cores runs that many hashes in parallel while the event loop
    keeps serving other calls. ``metrics`` gets each hash's and verify's
    wait for a thread and its time in the thread.
    """

    def __init__(
        self,
        *,
        time_cost: int,
        memory_kib: int,
        parallelism: int,
        executor: Executor,
        metrics: Metrics | None = None,
    ) -> None:
        self._metrics: Metrics = metrics or NoMetrics()
        self._hasher = argon2.PasswordHasher(
            time_cost=time_cost,
            memory_cost=memory_kib,
            parallelism=parallelism,
            type=argon2.Type.ID,
        )
        self._executor = executor
        # Verified against when the email is unknown, so that an unknown email
        # costs what a wrong password costs.
        self._dummy_hash = self._hasher.hash(secrets.token_urlsafe(16))

    async def hash(self, password: str) -> str:
        return await self._in_thread("hash", lambda: self._hasher.hash(password))

    async def verify(self, password_hash: str, password: str) -> bool:
        return await self._in_thread("verify", lambda: self._verify(password_hash, password))

    async def _in_thread(self, op: str, work: Callable[[], T]) -> T:
        submitted = time.perf_counter()

        def timed() -> T:
            began = time.perf_counter()
            try:
                return work()
            finally:
                self._metrics.password_hash(op, began - submitted, time.perf_counter() - began)

        return await asyncio.get_running_loop().run_in_executor(self._executor, timed)

    def _verify(self, password_hash: str, password: str) -> bool:
        try:
            return self._hasher.verify(password_hash, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False

    def needs_rehash(self, password_hash: str) -> bool:
        try:
            return self._hasher.check_needs_rehash(password_hash)
        except InvalidHashError:
            return True

    async def burn(self, password: str) -> None:
        await self.verify(self._dummy_hash, password)
