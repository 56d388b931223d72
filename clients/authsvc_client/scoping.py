"""Tenant scoping for services that call other services.

Two halves:

* **Helpers** with the meaning of the seed's ``BaseAuthClient`` methods, over
  ``authsvc_client.v1.resources_pb2.SessionInfo`` (what ``Authenticate`` and the
  sidecar's ``current_session()`` hand you): ``is_authorized``,
  ``is_org_authorized``, ``is_same_org``, ``is_same_org_slug`` and
  ``assert_same_org`` (by id, or ``slug=``), which raises ``OrgMismatch``
  (PERMISSION_DENIED / ORG_MISMATCH).

* **Client interceptors** that attach the caller's credentials
  (``authorization: Bearer <token>``) to every outgoing call and refuse,
  before anything is sent, a request that names an organization other than
  the session's active org::

      channel = grpc.aio.insecure_channel(target, interceptors=aio_interceptors())
      notes = NotesStub(channel)
      await notes.GetNote(GetNoteRequest(org_id=other_org, ...))
      # -> grpc.aio.AioRpcError PERMISSION_DENIED; from_rpc_error(...) is an OrgMismatch

  A request *names an org* when a tenant string field of it, at any depth of
  its set message fields (singular, repeated and map values), is set and not
  empty (a oneof member other than the chosen one is not set; a field with
  presence counts only when set, whatever its default). Which fields are tenant
  fields, and by which key, says the ``(authsvc.v1.tenant)`` field option
  (``TenantKey``, authsvc/v1/options.proto):

  ============================  ===============================================
  ``TENANT_KEY_ORG_ID``         an org id
  ``TENANT_KEY_ORG_SLUG``       an org slug
  ``TENANT_KEY_NONE``           not a tenant field, whatever its name
                                (``SetActiveOrgRequest.org_id`` and ``org_slug``
                                name the org to switch to, not the one acted in)
  unset or ``UNSPECIFIED``      by name: ``org_id`` is an id, ``org_slug`` a
                                slug, any other field neither
  any other value               (a key newer than this client) refused whenever
                                set: a check this code cannot make fails closed
  ============================  ===============================================

  Each named org must be the session's active org. An id must be its
  ``org_id``, compared as UUIDs when both are one (canonical 8-4-4-4-12 hex
  digits in any case, optionally in braces: ``{0A...}`` is ``0a...``) and as
  exact strings otherwise (an id that is not a UUID matches only itself; other
  spellings ``uuid.UUID()`` takes, such as ``urn:uuid:`` or no hyphens, count as
  such strings). A slug must be its ``org_slug``, exactly (authsvc takes slugs
  in lowercase only and never folds them). With no session, or a session
  without an active org, any named org is refused; a session whose token
  carries no ``org_slug`` claim (one minted by a server older than the claim)
  refuses every slug. ``google.protobuf.Any`` fields are opaque and not
  inspected.

  **Slugs are taken from the token.** The session's slug is the ``org_slug``
  claim (``session_from_token``, ``token_credentials``) or the sidecar's
  ``SessionInfo.org_slug`` (``inbound_credentials``; the claim too, or
  Authenticate's live answer while it checks online). The client trusts it and
  never looks the slug up: it only decides what this side refuses to send, and
  the receiving server is authoritative. So after the org's slug changes
  (UpdateOrg), a token minted before carries the old slug until it is
  refreshed: a request naming the org by its new slug is refused here (a
  refusal on the safe side), and one naming the old slug is sent, and authsvc,
  which compares the slug the org has now, refuses it (ORG_MISMATCH, not from
  the client); a service behind the sidecar refuses such a token TOKEN_STALE,
  since a slug change is a claims change. Refresh the token, then name the new
  slug. Naming the org by ``org_id`` is not affected: ids never change.

  **How a refusal looks.** Exactly like a refusal by the server: the call
  fails with ``grpc.aio.AioRpcError`` (sync channels: a ``grpc.RpcError`` that
  is also a ``grpc.Call``) with code PERMISSION_DENIED and trailing metadata
  carrying a ``google.rpc.Status`` with ``ErrorInfo(domain="authsvc",
  reason="ORG_MISMATCH", metadata={"origin": "client", "field": <full field
  name>})``. ``from_rpc_error`` turns it into ``OrgMismatch``, and
  ``authsvc_client.client.AuthsvcClient`` raises that directly, so callers
  handle a local and a remote ORG_MISMATCH with the same ``except``. (The
  typed exception alone would break the grpc.aio call object: its ``code()``
  and ``details()`` only survive an ``AioRpcError`` raised by an interceptor.)

  **Where credentials come from.** A ``CredentialSource``: a callable
  returning ``(access_token, SessionInfo)`` or ``None`` (no caller: nothing
  is attached and every tenant field is refused). The default,
  ``inbound_credentials``, takes them from the call being served
  (``authsvc_client.sidecar.current_token()`` / ``current_session()``), so a
  service behind the sidecar calls downstream services as its caller.
  ``token_credentials(token)`` serves a fixed token (or a callable returning
  the current one) with the SessionInfo decoded from its claims: not verified
  here, since the receiving side verifies it; the claims only decide what
  this side refuses to send. The interceptor's credentials replace any
  ``authorization`` metadata the call carries, so the identity checked here
  is the identity sent.

  grpc.aio files an interceptor object under the first interceptor kind it
  implements only, so unary-unary and unary-stream calls need one object
  each: ``aio_interceptors()`` returns both. Classic channels take
  ``SyncTenantScopeInterceptor`` (both kinds in one object) through
  ``grpc.intercept_channel``.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple, cast

import grpc
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from authsvc_client._tokens import ORG_ROLE_CLAIMS, ROLE_CLAIMS
from authsvc_client.errors import OrgMismatch, status_metadata
from authsvc_client.v1 import options_pb2, resources_pb2

__all__ = [
    "CredentialSource",
    "Credentials",
    "OrgMismatch",
    "SyncTenantScopeInterceptor",
    "TenantScope",
    "TenantScopeInterceptor",
    "TenantScopeStreamInterceptor",
    "aio_interceptors",
    "assert_same_org",
    "inbound_credentials",
    "is_authorized",
    "is_org_authorized",
    "is_same_org",
    "is_same_org_slug",
    "same_org_id",
    "session_from_token",
    "tenant_fields",
    "token_credentials",
]

SessionInfo = resources_pb2.SessionInfo
RoleLike = str | int

# --------------------------------------------------------------------------- helpers


def _role_values(roles: Sequence[RoleLike], names: Mapping[str, int], prefix: str) -> set[int]:
    """``"admin"``, ``"ROLE_ADMIN"`` or the enum value -> the enum value.

    An unknown name or value raises ``ValueError`` rather than matching
    nothing: a typo in an authorization check must not pass silently as
    "nobody may".
    """
    values: set[int] = set()
    valid = set(names.values())
    for role in roles:
        if isinstance(role, str):
            key = role.lower().removeprefix(prefix)
            if key not in names:
                raise ValueError(f"unknown role {role!r}; expected one of {sorted(names)}")
            values.add(names[key])
        elif isinstance(role, int) and not isinstance(role, bool) and role in valid:
            values.add(role)
        else:
            raise ValueError(f"unknown role {role!r}")
    return values


def is_authorized(session: SessionInfo, *roles: RoleLike) -> bool:
    """True iff the session's platform role is one of ``roles``.

    Args:
        session: who is calling.
        roles: ``"user"`` / ``"admin"`` (any case, ``ROLE_`` prefix allowed) or
            ``resources_pb2.Role`` values.

    Raises:
        ValueError: a role that does not exist.
    """
    return session.role in _role_values(roles, ROLE_CLAIMS, "role_")


# A UUID's canonical text in any case, alone or in braces.
_UUID_TEXT = re.compile(
    r"(\{)?([0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})(?(1)\})"
)


def _org_key(org_id: str) -> str:
    """What org ids are compared by: a UUID's lowercase canonical text, else the string."""
    found = _UUID_TEXT.fullmatch(org_id)
    return found[2].lower() if found else org_id


def same_org_id(a: str | uuid.UUID, b: str | uuid.UUID) -> bool:
    """True iff ``a`` and ``b`` name the same org: equal as UUIDs when both
    are one (any case, braces or not), else equal as strings. Empty never matches."""
    a, b = str(a), str(b)
    if not a or not b:
        return False
    return a == b or _org_key(a) == _org_key(b)


def is_same_org(session: SessionInfo, org_id: str | uuid.UUID) -> bool:
    """True iff the session has an active org and it is ``org_id``.

    The tenant check with no role gating, for handlers that do their own role
    logic or only confirm a resource belongs to the caller's org. An empty
    ``org_id`` never matches; ids compare as ``same_org_id`` does.
    """
    return same_org_id(session.org_id, org_id)


def is_org_authorized(session: SessionInfo, org_id: str | uuid.UUID, *roles: RoleLike) -> bool:
    """True iff ``org_id`` is the session's active org and its org role is one of ``roles``.

    Args:
        session: who is calling.
        org_id: the org the action is in.
        roles: ``"owner"`` / ``"admin"`` / ``"member"`` (any case, ``ORG_ROLE_``
            prefix allowed) or ``resources_pb2.OrgRole`` values.

    Raises:
        ValueError: a role that does not exist.
    """
    allowed = _role_values(roles, ORG_ROLE_CLAIMS, "org_role_")
    return is_same_org(session, org_id) and session.org_role in allowed


def is_same_org_slug(session: SessionInfo, slug: str) -> bool:
    """True iff the session has an active org and ``slug`` is its slug, exactly.

    The session's slug is the one its token carries (``org_slug``), or
    Authenticate's; empty never matches.
    """
    return bool(session.org_id and session.org_slug and slug == session.org_slug)


def assert_same_org(
    session: SessionInfo | None, org_id: str | uuid.UUID | None = None, *, slug: str | None = None
) -> None:
    """The one-liner for tenant scoping at the top of a handler.

    ``session = current_session(); assert_same_org(session, note.org_id)``, or
    ``assert_same_org(session, slug=request.org_slug)`` for a request that names
    the org by slug. Give one of ``org_id`` and ``slug``; an empty one (or
    none) names no org, and is refused.

    Raises:
        OrgMismatch: no session, no active org, or another org
            (PERMISSION_DENIED / ORG_MISMATCH).
        ValueError: both ``org_id`` and ``slug``.
    """
    if org_id is not None and slug is not None:
        raise ValueError("give org_id or slug, not both")
    if session is None or not session.org_id:
        raise OrgMismatch(message="the session has no active organization")
    same = (
        is_same_org_slug(session, slug) if slug is not None else is_same_org(session, org_id or "")
    )
    if not same:
        raise OrgMismatch(message="the organization is not the session's active organization")


# --------------------------------------------------------------------------- tenant fields


class _Node:
    """Where tenant fields may sit in one message type."""

    __slots__ = ("messages", "strings")

    def __init__(self) -> None:
        # (field name, full name, kind, key) of its tenant string fields; kind
        # is "many" (repeated), "set" (has presence: counts only when set) or
        # "one"; key is _ID, _SLUG or _UNKNOWN
        self.strings: tuple[tuple[str, str, str, str], ...] = ()
        # (field name, kind, node of the field's message type) of the message
        # fields that can hold tenant fields: kind is "one", "many" (repeated)
        # or "map" (map with message values)
        self.messages: tuple[tuple[str, str, _Node], ...] = ()


_EMPTY = _Node()


# What a tenant field holds.
_ID, _SLUG, _UNKNOWN = "id", "slug", "unknown"
_BY_NAME = {"org_id": _ID, "org_slug": _SLUG}
_BY_KEY = {
    options_pb2.TENANT_KEY_ORG_ID: _ID,
    options_pb2.TENANT_KEY_ORG_SLUG: _SLUG,
    options_pb2.TENANT_KEY_NONE: None,
}


def _tenant_key(field: FieldDescriptor) -> str | None:
    """``_ID``, ``_SLUG``, ``_UNKNOWN`` (a TenantKey newer than this code), or
    None for a field that names no tenant."""
    if field.type != FieldDescriptor.TYPE_STRING:
        return None
    options = field.GetOptions()
    if options.HasExtension(options_pb2.tenant):
        key = options.Extensions[options_pb2.tenant]
        if key != options_pb2.TENANT_KEY_UNSPECIFIED:
            return _BY_KEY.get(key, _UNKNOWN)
    return _BY_NAME.get(field.name)


class _TenantIndex:
    """Message full name -> where its tenant fields are; each type walked once.

    Safe to share between threads: a node is linked completely before it is
    published, so a reader never sees a half-built one (which would let a
    tenant field through unchecked).
    """

    def __init__(self) -> None:
        # ``_EMPTY``: the type cannot hold a tenant field
        self._nodes: dict[str, _Node] = {}

    def node(self, descriptor: Descriptor) -> _Node:
        cached = self._nodes.get(descriptor.full_name)
        return cached if cached is not None else self._build(descriptor)

    def _build(self, descriptor: Descriptor) -> _Node:
        """Walks every message type reachable from ``descriptor`` not yet
        indexed, keeps those that can reach a tenant field (a fixpoint, so
        recursive types work) and publishes a node for each."""
        known = dict(self._nodes)
        # 1. the reachable types: own tenant strings and message-typed edges
        strings: dict[str, list[tuple[str, str, str, str]]] = {}
        edges: dict[str, list[tuple[str, str, str]]] = {}
        pending = [descriptor]
        while pending:
            current = pending.pop()
            name = current.full_name
            if name in strings or name in known:
                continue
            strings[name], edges[name] = [], []
            for field in current.fields:
                repeated = _is_repeated(field)
                key = _tenant_key(field)
                if key is not None:
                    how = "many" if repeated else "set" if field.has_presence else "one"
                    strings[name].append((field.name, field.full_name, how, key))
                elif field.type == FieldDescriptor.TYPE_MESSAGE:
                    sub_type = cast(Descriptor, field.message_type)
                    kind = "many" if repeated else "one"
                    if sub_type.GetOptions().map_entry:
                        value = sub_type.fields_by_name["value"]
                        if value.type != FieldDescriptor.TYPE_MESSAGE:
                            continue  # map<_, scalar>: map entries carry no options
                        sub_type, kind = cast(Descriptor, value.message_type), "map"
                    edges[name].append((field.name, kind, sub_type.full_name))
                    pending.append(sub_type)

        # 2. which of them can reach a tenant field
        live = {name for name, own in strings.items() if own}

        def relevant(name: str) -> bool:
            return name in live or known.get(name, _EMPTY) is not _EMPTY

        changed = True
        while changed:
            changed = False
            for name, out in edges.items():
                if name not in live and any(relevant(target) for _, _, target in out):
                    live.add(name)
                    changed = True

        # 3. nodes for them, linked, then published
        built = {name: _Node() if name in live else _EMPTY for name in strings}
        known.update(built)
        for name in live:
            node = built[name]
            node.strings = tuple(strings[name])
            node.messages = tuple(
                (field, kind, known[target])
                for field, kind, target in edges[name]
                if relevant(target)
            )
        self._nodes.update(built)
        return built[descriptor.full_name]


def _is_repeated(field: FieldDescriptor) -> bool:
    # `is_repeated` replaces `label` (gone in protobuf 7); older releases have only `label`.
    flag = getattr(field, "is_repeated", None)
    if flag is None:
        return bool(getattr(field, "label", 0) == 3)  # LABEL_REPEATED
    return bool(flag)


def tenant_fields(descriptor: Any) -> list[str]:
    """The full names of the tenant fields reachable from a message type (its
    ``DESCRIPTOR``), for tests and docs."""
    out: list[str] = []
    seen: set[int] = set()

    def walk(node: _Node) -> None:
        if id(node) in seen:
            return
        seen.add(id(node))
        out.extend(full for _, full, _, _ in node.strings)
        for _, _, child in node.messages:
            walk(child)

    walk(_TenantIndex().node(descriptor))
    return out


def _named_orgs(message: Message, node: _Node) -> Iterator[tuple[str, str, str]]:
    """(field full name, org, key) for every non-empty tenant field set in ``message``."""
    for name, full, how, key in node.strings:
        if how == "set" and not message.HasField(name):
            continue  # a oneof member not chosen, or an optional field not set
        value: Any = getattr(message, name)
        if how == "many":
            for item in value:
                if item:
                    yield full, item, key
        elif value:
            yield full, value, key
    for name, kind, child in node.messages:
        if kind == "one":
            if message.HasField(name):
                yield from _named_orgs(getattr(message, name), child)
        elif kind == "many":
            for item in getattr(message, name):
                yield from _named_orgs(item, child)
        else:
            for item in getattr(message, name).values():
                yield from _named_orgs(item, child)


# --------------------------------------------------------------------------- credentials


class Credentials(NamedTuple):
    """What the interceptor sends and checks against."""

    access_token: str
    session: SessionInfo


CredentialSource = Callable[[], Credentials | tuple[str, SessionInfo] | None]


def inbound_credentials() -> Credentials | None:
    """The credentials of the call being served (set by the sidecar interceptor)."""
    # Imported here: the sidecar depends on this package's errors, and a
    # caller that only uses static tokens need not load it.
    from authsvc_client import sidecar

    token = sidecar.current_token()
    session = sidecar.current_session()
    if token is None or session is None:
        return None
    return Credentials(token, session)


def _b64url(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def session_from_token(token: str) -> SessionInfo:
    """The SessionInfo an access token claims: session, user, role, org id, slug
    and role, expiry (``email`` is not a claim: left empty).

    NOT a verification: it trusts the token's payload. Use it only to decide
    what to send; the receiver verifies the token.

    Raises:
        ValueError: not a JWT with authsvc's claims.
    """
    try:
        _, payload, _ = token.split(".")
        claims = json.loads(_b64url(payload))
    except (ValueError, binascii.Error) as error:
        raise ValueError("not a JWT") from error
    if not isinstance(claims, dict) or not all(
        isinstance(claims.get(k), str) for k in ("sub", "sid")
    ):
        raise ValueError("the token lacks the sub and sid claims")
    info = SessionInfo(
        session_id=claims["sid"],
        user_id=claims["sub"],
        role=ROLE_CLAIMS.get(str(claims.get("role", "")), resources_pb2.ROLE_UNSPECIFIED),
    )
    org = claims.get("org_id")
    if isinstance(org, str) and org:
        info.org_id = org
        info.org_role = ORG_ROLE_CLAIMS.get(
            str(claims.get("org_role", "")), resources_pb2.ORG_ROLE_UNSPECIFIED
        )
        slug = claims.get("org_slug")
        if isinstance(slug, str):
            info.org_slug = slug
    exp = claims.get("exp")
    if isinstance(exp, int):
        info.expire_time.CopyFrom(Timestamp(seconds=exp))
    return info


def token_credentials(token: str | Callable[[], str]) -> Callable[[], Credentials]:
    """A CredentialSource for a fixed token, or a callable returning the current one.

    The SessionInfo is decoded from the token's claims (see
    ``session_from_token``), once per distinct token.

    Raises:
        ValueError: (at once for a fixed token, else at the call) not a JWT.
    """
    last: list[Credentials] = []

    def current() -> Credentials:
        value = token() if callable(token) else token
        if not last or last[0].access_token != value:
            last[:] = [Credentials(value, session_from_token(value))]
        return last[0]

    if not callable(token):
        current()
    return current


# --------------------------------------------------------------------------- the check


class _Refusal(Exception):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


class TenantScope:
    """The check and the credentials, shared by the interceptor classes.

    Args:
        credentials: where the token and session come from (see the module
            docstring); default ``inbound_credentials``.
    """

    def __init__(self, credentials: CredentialSource = inbound_credentials) -> None:
        self._credentials = credentials
        self._index = _TenantIndex()

    def check(self, request: object) -> Credentials | None:
        """The credentials to send with ``request``.

        Raises:
            _Refusal: the request names an org other than the session's.
            TypeError: the request is not a protobuf message (serialized
                bytes cannot be inspected, so they are not sent).
        """
        if not isinstance(request, Message):
            raise TypeError(
                "the tenant-scoping interceptor needs protobuf messages, "
                f"not {type(request).__name__}"
            )
        found = self._credentials()
        creds = None if found is None else Credentials(*found)
        node = self._index.node(cast(Descriptor, request.DESCRIPTOR))
        if node is _EMPTY:
            return creds
        session = creds.session if creds is not None else None
        active = session.org_id if session is not None else ""
        for field, org, key in _named_orgs(request, node):
            if not active:
                raise _Refusal(field, f"{field} names an organization and there is no active org")
            if key == _ID:
                same = same_org_id(org, active)
            elif key == _SLUG:
                assert session is not None
                if not session.org_slug:
                    raise _Refusal(
                        field,
                        f"{field} names an organization by slug and the session's token "
                        "carries no org slug",
                    )
                same = org == session.org_slug
            else:
                raise _Refusal(field, f"{field} has a tenant key this client does not know")
            if not same:
                raise _Refusal(field, f"{field} names another organization than the active org")
        return creds


def _refusal_trailers(refusal: _Refusal) -> tuple[tuple[str, bytes]]:
    return status_metadata(
        grpc.StatusCode.PERMISSION_DENIED,
        OrgMismatch.REASON,
        refusal.message,
        {"origin": "client", "field": refusal.field},
    )


def _aio_error(refusal: _Refusal) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(
        grpc.StatusCode.PERMISSION_DENIED,
        initial_metadata=grpc.aio.Metadata(),
        trailing_metadata=grpc.aio.Metadata(*_refusal_trailers(refusal)),
        details=refusal.message,
        debug_error_string="refused locally by the tenant-scoping interceptor",
    )


def _with_token(metadata: Any, token: str | None) -> list[tuple[str, Any]]:
    kept = [(k, v) for k, v in (metadata or ()) if k != "authorization"]
    if token is not None:
        kept.append(("authorization", f"Bearer {token}"))
    return kept


def _aio_details(
    details: grpc.aio.ClientCallDetails, creds: Credentials | None
) -> grpc.aio.ClientCallDetails:
    if creds is None and not details.metadata:
        return details
    metadata = grpc.aio.Metadata(*_with_token(details.metadata, creds and creds.access_token))
    return grpc.aio.ClientCallDetails(
        details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
    )


class TenantScopeInterceptor(grpc.aio.UnaryUnaryClientInterceptor):
    """Unary-unary calls on a ``grpc.aio`` channel; see the module docstring.

    Pair it with ``TenantScopeStreamInterceptor`` (or use ``aio_interceptors``)
    to cover server-streaming calls too.
    """

    def __init__(
        self,
        credentials: CredentialSource = inbound_credentials,
        *,
        scope: TenantScope | None = None,
    ) -> None:
        self.scope = scope or TenantScope(credentials)

    async def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Awaitable[Any]],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        try:
            creds = self.scope.check(request)
        except _Refusal as refusal:
            raise _aio_error(refusal) from None
        return await continuation(_aio_details(client_call_details, creds), request)


class TenantScopeStreamInterceptor(grpc.aio.UnaryStreamClientInterceptor):
    """Unary-stream calls on a ``grpc.aio`` channel; see the module docstring."""

    def __init__(
        self,
        credentials: CredentialSource = inbound_credentials,
        *,
        scope: TenantScope | None = None,
    ) -> None:
        self.scope = scope or TenantScope(credentials)

    async def intercept_unary_stream(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Awaitable[Any]],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        try:
            creds = self.scope.check(request)
        except _Refusal as refusal:
            raise _aio_error(refusal) from None
        return await continuation(_aio_details(client_call_details, creds), request)


def aio_interceptors(
    credentials: CredentialSource = inbound_credentials,
) -> list[grpc.aio.ClientInterceptor]:
    """Both aio interceptors on one scope, for ``grpc.aio.*_channel(interceptors=...)``."""
    scope = TenantScope(credentials)
    return [TenantScopeInterceptor(scope=scope), TenantScopeStreamInterceptor(scope=scope)]


# --------------------------------------------------------------------------- classic grpc


class LocalRpcError(grpc.RpcError, grpc.Call):
    """A call refused before it was sent, shaped like a failed sync call."""

    def __init__(self, refusal: _Refusal) -> None:
        super().__init__(refusal.message)
        self._message = refusal.message
        self._trailers = _refusal_trailers(refusal)

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.PERMISSION_DENIED

    def details(self) -> str:
        return self._message

    def initial_metadata(self) -> tuple[Any, ...]:
        return ()

    def trailing_metadata(self) -> tuple[Any, ...]:
        return self._trailers

    def debug_error_string(self) -> str:
        return "refused locally by the tenant-scoping interceptor"

    def is_active(self) -> bool:
        return False

    def time_remaining(self) -> float:
        return 0.0

    def cancel(self) -> bool:
        return False

    def add_callback(self, callback: Callable[[], None]) -> bool:
        return False


class _SyncCallDetails(grpc.ClientCallDetails):
    def __init__(self, details: grpc.ClientCallDetails, metadata: list[tuple[str, Any]]) -> None:
        self.method = details.method
        self.timeout = details.timeout
        self.metadata = tuple(metadata)
        self.credentials = details.credentials
        self.wait_for_ready = getattr(details, "wait_for_ready", None)
        self.compression = getattr(details, "compression", None)


def _sync_details(details: grpc.ClientCallDetails, creds: Credentials | None) -> Any:
    if creds is None and not details.metadata:
        return details
    return _SyncCallDetails(details, _with_token(details.metadata, creds and creds.access_token))


class SyncTenantScopeInterceptor(
    grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor
):
    """For classic (threaded) channels: ``grpc.intercept_channel(channel, interceptor)``.

    A refused call raises ``LocalRpcError`` (a ``grpc.RpcError`` and
    ``grpc.Call``; ``from_rpc_error`` reads it). The default credential source
    reads the inbound call of the current thread (the sidecar's sync
    interceptor sets it).
    """

    def __init__(self, credentials: CredentialSource = inbound_credentials) -> None:
        self.scope = TenantScope(credentials)

    def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.ClientCallDetails, Any], Any],
        client_call_details: grpc.ClientCallDetails,
        request: Any,
    ) -> Any:
        try:
            creds = self.scope.check(request)
        except _Refusal as refusal:
            raise LocalRpcError(refusal) from None
        return continuation(_sync_details(client_call_details, creds), request)

    def intercept_unary_stream(
        self,
        continuation: Callable[[grpc.ClientCallDetails, Any], Any],
        client_call_details: grpc.ClientCallDetails,
        request: Any,
    ) -> Any:
        try:
            creds = self.scope.check(request)
        except _Refusal as refusal:
            raise LocalRpcError(refusal) from None
        return continuation(_sync_details(client_call_details, creds), request)
