"""The server interceptor: request id, credentials, errors and the access log.

For every authsvc method it resolves the caller's credentials, enforces the
method's declared access before the handler runs, maps domain errors to
statuses (``authsvc.api.status``), turns anything unexpected into a generic
INTERNAL, and logs one line per call. Servicers therefore hold no try/except
and no status codes. A reason the method does not declare (its
``(authsvc.v1.errors)`` and the generic ones) still goes out, and is logged as
``error.undeclared_reason`` and recorded: the contract and the code disagree.

On ACCESS_PUBLIC methods an ``authorization`` header is not read at all: their
credential, if they need one, is in the request (a refresh token, the access
token to resolve, a password), so a channel that attaches the user's access
token to every call can still refresh once that token has expired. An
``x-api-key`` is still checked there, since it is what lets a gateway pass
ClientInfo.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hmac
import inspect
import os
import re
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from typing import Any, TypeAlias, cast

import grpc
import structlog
from google.protobuf.message import DecodeError

from authsvc.api import access as acc
from authsvc.api.status import to_status
from authsvc.domain.principal import ANONYMOUS, Principal, PrincipalKind, SessionInfo
from authsvc.errors import (
    ApiKeyInvalid,
    AuthError,
    InvalidArgument,
    NotAuthenticated,
    PermissionDenied,
    TokenInvalid,
)
from authsvc.metrics import GrpcServerMetrics, MethodMetrics, handler_type
from authsvc.security.secrets import sha256

log = structlog.get_logger("authsvc.rpc")

_principal: contextvars.ContextVar[Principal] = contextvars.ContextVar(
    "authsvc_principal", default=ANONYMOUS
)
# Matched with fullmatch: "$" would also accept a value ending in a newline.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# A credential header sent more than once: refused, never "the last one wins".
_TWICE = object()

Authenticate = Callable[[str], Awaitable[SessionInfo]]
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"


def current_principal() -> Principal:
    """The caller of the RPC being served (set by the interceptor)."""
    return _principal.get()


class ApiKeys:
    """Service credentials, held as SHA-256 digests only.

    Configured as ``name:sha256hex`` entries separated by commas
    (``authsvc api-key new NAME`` prints one).
    """

    def __init__(self, spec: str) -> None:
        self._by_digest: dict[bytes, str] = {}
        for entry in filter(None, (e.strip() for e in spec.split(","))):
            name, _, digest = entry.partition(":")
            raw = bytes.fromhex(digest)
            if not name or len(raw) != 32:
                raise ValueError("AUTHSVC_API_KEYS entries are name:sha256hex")
            self._by_digest[raw] = name

    def lookup(self, key: str) -> str | None:
        digest = sha256(key)
        for known, name in self._by_digest.items():
            if hmac.compare_digest(known, digest):
                return name
        return None


class EdgeInterceptor(grpc.aio.ServerInterceptor):
    def __init__(
        self,
        table: Mapping[str, int],
        authenticate: Authenticate,
        api_keys: ApiKeys,
        reasons: Mapping[str, frozenset[str]] | None = None,
        metrics: GrpcServerMetrics | None = None,
    ) -> None:
        """``table``: method -> access (``access_table``); ``reasons``: method ->
        the reasons it may answer (``errors_table``); ``metrics``: the gRPC
        server metrics, counted here (None: metrics off, nothing counted)."""
        self._table = table
        self._metrics = metrics
        self._authenticate = authenticate
        self._api_keys = api_keys
        self._reasons: Mapping[str, frozenset[str]] = reasons or {}
        self._wrapped: dict[str, Handler] = {}
        #: (method, reason) of each failure this server answered with a reason
        #: its method does not declare (each such answer is also logged as
        #: ``error.undeclared_reason``): a gap between the contract and the code.
        self.undeclared: set[tuple[str, str]] = set()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        method: str = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None:
            return cached
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        access = self._table.get(method)
        if access is None and method.startswith("/authsvc."):
            access = -1  # undeclared: unreachable (cannot happen: the table is built from these)
        # access None: health and reflection, infrastructure open to every caller.
        # Only a method this server has a handler for gets metrics: a name a
        # client makes up never becomes a label value.
        m = self._metrics.method(method, handler_type(handler)) if self._metrics else None
        wrapped: Handler
        # Bytes in: a body that does not parse fails inside the wrapper as
        # INVALID_ARGUMENT with an ErrorInfo, not as a bare UNKNOWN.
        if handler.unary_unary is not None:
            wrapped = grpc.unary_unary_rpc_method_handler(
                self._wrap(method, access, handler.unary_unary, handler.request_deserializer, m),
                request_deserializer=None,
                response_serializer=handler.response_serializer,
            )
        elif handler.unary_stream is not None and access is not None:
            wrapped = grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(
                    method,
                    access,
                    cast(Callable[..., AsyncGenerator[Any, None]], handler.unary_stream),
                    handler.request_deserializer,
                    m,
                ),
                request_deserializer=None,
                response_serializer=handler.response_serializer,
            )
        elif m is not None:
            wrapped = _counted(handler, m)  # health Watch, reflection: counted only
        else:
            return handler
        self._wrapped[method] = wrapped
        return wrapped

    def _begin(self, context: grpc.aio.ServicerContext[Any, Any]) -> tuple[str, str, Any, Any]:
        """The call's request id, peer and credentials, read while the call is live.

        Everything the access log needs is taken here, at the start, and the
        log never reads the context again: once a call has ended its native
        call may be freed, and reading its peer then crashes the process (as
        it did when a cancelled stream's generator was closed by the event
        loop after its call was gone). A credential header given twice
        becomes ``_TWICE``.
        """
        request_id = ""
        bearer: Any = None
        api_key: Any = None
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                bearer = value if bearer is None else _TWICE
            elif key == "x-api-key":
                api_key = value if api_key is None else _TWICE
            elif key == "x-request-id" and isinstance(value, str) and _REQUEST_ID.fullmatch(value):
                request_id = value
        return request_id or os.urandom(16).hex(), context.peer() or "", bearer, api_key

    async def _admit(
        self,
        access: int | None,
        bearer: Any,
        api_key: Any,
        body: Any,
        deserialize: Callable[[bytes], Any] | None,
    ) -> Any:
        """Checks the credential, then parses the request."""
        if access == acc.PUBLIC:
            # The bearer is ignored, not verified: no lookup, no error for a
            # malformed, expired, revoked or forged one (see the module doc).
            _principal.set(self._public(api_key))
        elif access is not None:
            _principal.set(await self._resolve(access, bearer, api_key))
        try:
            return deserialize(body) if deserialize is not None else body
        except DecodeError:
            raise InvalidArgument("the request is not a valid message") from None

    async def _fail(
        self,
        error: Exception,
        method: str,
        request_id: str,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        """Aborts the call with the status of ``error``."""
        if isinstance(error, AuthError):
            declared = self._reasons.get(method)
            if declared is not None and error.reason not in declared:
                self._undeclared(method, error.reason)
            status = to_status(error, request_id)
            await context.abort(status.code, status.details, status.trailing_metadata)
        log.exception("rpc.failed", method=method, request_id=request_id)
        status = to_status(AuthError(), request_id)
        await context.abort(status.code, status.details, status.trailing_metadata)

    def _undeclared(self, method: str, reason: str) -> None:
        self.undeclared.add((method, reason))
        log.warning("error.undeclared_reason", method=method, reason=reason)

    def _log(
        self,
        method: str,
        code: str,
        reason: str,
        started: float,
        peer: str,
        request_id: str,
    ) -> None:
        log.info(
            "rpc",
            method=method,
            code=code,
            reason=reason,
            duration_ms=round((time.perf_counter() - started) * 1000, 3),
            peer=peer,
            request_id=request_id,
        )

    def _wrap(
        self,
        method: str,
        access: int | None,
        behavior: Callable[..., Awaitable[Any]],
        deserialize: Callable[[bytes], Any] | None,
        m: MethodMetrics | None,
    ) -> Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]:
        async def serve(body: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            started = time.perf_counter()
            request_id, peer, bearer, api_key = self._begin(context)
            deadline = m.begin(context, started) if m is not None else None
            code = "OK"
            reason = ""
            try:
                request = await self._admit(access, bearer, api_key, body, deserialize)
                if m is not None:
                    m.received.inc()
                response = await behavior(request, context)
                if m is not None:
                    m.sent.inc()
                return response
            except asyncio.CancelledError:
                code = "CANCELLED"  # the client went away or the deadline passed
                raise
            except grpc.aio.AbortError:
                if code == "OK":  # the handler aborted (health's NOT_FOUND)
                    code = _aborted_code(context)
                raise
            except Exception as error:
                code, reason = _outcome(error)
                await self._fail(error, method, request_id, context)
            finally:
                self._log(method, code, reason, started, peer, request_id)
                if m is not None:
                    m.end(code, started, deadline)

        return serve

    def _wrap_stream(
        self,
        method: str,
        access: int,
        behavior: Callable[..., AsyncGenerator[Any, None]],
        deserialize: Callable[[bytes], Any] | None,
        m: MethodMetrics | None,
    ) -> Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[None]]:
        # A coroutine that writes, not an async generator that yields: when the
        # client goes away while grpc is sending a yielded message, grpc drops
        # the generator suspended at its yield, and the event loop closes it
        # later, after the call has ended and its context is gone (this once
        # crashed the process). Here cancellation reaches this coroutine, in
        # the call's own task, and the handler's generator is closed at once.
        async def serve(body: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
            started = time.perf_counter()
            request_id, peer, bearer, api_key = self._begin(context)
            deadline = m.begin(context, started) if m is not None else None
            code = "OK"
            reason = ""
            gone = False  # a write failed: the call is over, there is nothing to abort
            try:
                request = await self._admit(access, bearer, api_key, body, deserialize)
                if m is not None:
                    m.received.inc()
                async with contextlib.aclosing(behavior(request, context)) as responses:
                    async for response in responses:
                        try:
                            await context.write(response)
                        except Exception:
                            gone = True
                            raise
                        if m is not None:
                            m.sent.inc()
            except asyncio.CancelledError:
                code = "CANCELLED"  # the watcher went away: the usual end of a stream
                raise
            except grpc.aio.AbortError:
                if code == "OK":
                    code = _aborted_code(context)
                raise
            except Exception as error:
                if gone:
                    code = "CANCELLED"  # grpc itself ends a call whose write failed
                    raise
                code, reason = _outcome(error)
                await self._fail(error, method, request_id, context)
            finally:
                self._log(method, code, reason, started, peer, request_id)
                if m is not None:
                    m.end(code, started, deadline)

        return serve

    def _service_name(self, api_key: Any) -> str | None:
        """The service an ``x-api-key`` names; None when none was sent.

        Raises:
            ApiKeyInvalid: sent twice, or not a key this server knows.
        """
        if api_key is None:
            return None
        if api_key is _TWICE:
            raise ApiKeyInvalid("only one x-api-key header may be sent")
        service_name = self._api_keys.lookup(str(api_key))
        if service_name is None:
            raise ApiKeyInvalid()
        return service_name

    def _public(self, api_key: Any) -> Principal:
        """The caller of an ACCESS_PUBLIC method: a service, or anonymous."""
        service_name = self._service_name(api_key)
        if service_name is None:
            return ANONYMOUS
        return Principal(PrincipalKind.SERVICE, None, service_name)

    async def _resolve(self, access: int, bearer: Any, api_key: Any) -> Principal:
        if api_key is _TWICE:
            raise ApiKeyInvalid("only one x-api-key header may be sent")
        if bearer is _TWICE:
            raise TokenInvalid("only one authorization header may be sent")
        service_name = self._service_name(api_key)
        session = None
        if bearer is not None:
            scheme, _, token = str(bearer).partition(" ")
            if scheme.lower() != "bearer" or not token:
                raise TokenInvalid("authorization must be 'Bearer <access token>'")
            session = await self._authenticate(token.strip())
        if access == acc.USER:
            if session is None:
                raise NotAuthenticated()
            return Principal(PrincipalKind.USER, session, service_name)
        if access in (acc.SELF_OR_ADMIN, acc.ADMIN, acc.ORG):
            if service_name is not None:
                return Principal(PrincipalKind.SERVICE, session, service_name)
            if session is None:
                raise NotAuthenticated()
            principal = Principal(PrincipalKind.USER, session)
            if access == acc.ADMIN and not principal.is_admin:
                raise PermissionDenied()
            return principal
        raise PermissionDenied()


def _outcome(error: Exception) -> tuple[str, str]:
    if isinstance(error, AuthError):
        return error.code, error.reason
    return "INTERNAL", "INTERNAL"


def _aborted_code(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    """The code a handler aborted with (read in the call's task, while it is live)."""
    return getattr(context.code(), "name", None) or "UNKNOWN"


def _counted(handler: Handler, m: MethodMetrics) -> Handler:
    """A streaming handler the edge does not otherwise wrap (health's Watch,
    reflection), counted: started, handled by code, latency, messages.

    Messages a coroutine handler writes with ``context.write`` (health's
    Watch) are not seen here; those a generator yields are.
    """
    behavior: Any = handler.unary_stream or handler.stream_stream or handler.stream_unary
    streaming_in = handler.request_streaming

    def begin(
        request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> tuple[Any, float, float | None]:
        started = time.perf_counter()
        deadline = m.begin(context, started)
        if streaming_in:
            return _received(request, m), started, deadline
        m.received.inc()
        return request, started, deadline

    def failed(error: BaseException, context: grpc.aio.ServicerContext[Any, Any]) -> str:
        if isinstance(error, asyncio.CancelledError | GeneratorExit):
            return "CANCELLED"
        if isinstance(error, grpc.aio.AbortError):
            return _aborted_code(context)
        return "UNKNOWN"  # what grpc answers for an exception in a handler

    serve: Any
    if inspect.isasyncgenfunction(behavior):

        async def generate(
            request: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncGenerator[Any, None]:
            request, started, deadline = begin(request, context)
            code = "OK"
            try:
                async with contextlib.aclosing(behavior(request, context)) as responses:
                    async for response in responses:
                        yield response
                        m.sent.inc()
            except BaseException as error:
                code = failed(error, context)
                raise
            finally:
                m.end(code, started, deadline)

        serve = generate
    else:

        async def run(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            request, started, deadline = begin(request, context)
            code = "OK"
            try:
                response = await behavior(request, context)
                if response is not None:
                    m.sent.inc()
                return response
            except BaseException as error:
                code = failed(error, context)
                raise
            finally:
                m.end(code, started, deadline)

        serve = run
    make = {
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
    }[(handler.request_streaming, handler.response_streaming)]
    return make(
        serve,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


async def _received(requests: Any, m: MethodMetrics) -> AsyncGenerator[Any, None]:
    async for request in requests:
        m.received.inc()
        yield request
