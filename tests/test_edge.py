"""The API edge: oversized credentials, error sizes, request ids, ids and
duplicate credential headers.

Every server test runs on both backends through a default client channel
(default client metadata limits), so what a test sees is what any client sees.
"""

from __future__ import annotations

import asyncio
import json
import math
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import grpc
import jwt
import pytest
from google.protobuf.field_mask_pb2 import FieldMask
from google.rpc import error_details_pb2, status_pb2

from authsvc.api.edge import EdgeInterceptor
from authsvc.api.status import to_status
from authsvc.errors import AuthError, FieldViolation, InvalidArgument
from authsvc.security.jwt_tokens import AccessTokenCodec
from authsvc_client.errors import AuthsvcError
from authsvc_client.v1 import auth_pb2, orgs_pb2, resources_pb2, sessions_pb2, users_pb2
from tests.app import (
    API_KEY,
    Api,
    Backend,
    bearer,
    failure,
    org_with_owner,
    remember,
    service,
    start_api,
    stop_api,
)

KB = 1024
UNAUTH = grpc.StatusCode.UNAUTHENTICATED
IA = grpc.StatusCode.INVALID_ARGUMENT
# Default client limit on received metadata (below it nothing is refused).
CLIENT_METADATA_LIMIT = 8 * KB

Metadata = tuple[tuple[str, str], ...]


def assert_error_info(error: AuthsvcError, code: grpc.StatusCode, reason: str) -> None:
    """The status is ``code`` and carries authsvc's ErrorInfo with ``reason``."""
    assert (error.code, error.reason) == (code, reason), (error.code, error.message[:200])
    assert error.detail(error_details_pb2.ErrorInfo) is not None
    assert error.request_id


def max_token_length(api: Api) -> int:
    settings = api.settings
    codec = AccessTokenCodec(
        issuer=settings.issuer,
        audience=settings.audience,
        ttl=timedelta(seconds=settings.access_token_ttl),
    )
    return codec.max_length


# -- oversized credentials ----------------------------------------------------------


def _junk_jwt(size: int) -> str:
    """A JWT-shaped string of ``size`` characters (three base64url parts)."""
    part = (size - 2) // 3
    first = "A" * part
    return ".".join([first, "B" * part, "C" * (size - 2 - 2 * part)])


@pytest.mark.parametrize("size", [8 * KB, 16 * KB, 64 * KB])
async def test_an_oversized_bearer_is_token_invalid_every_time(api: Api, size: int) -> None:
    """Far over any token authsvc issues, yet under the server's metadata
    limit: refused by the edge as TOKEN_INVALID with an ErrorInfo, every time
    (not RESOURCE_EXHAUSTED from the transport, some of the time)."""
    for attempt in range(20):
        token = _junk_jwt(size) if attempt % 2 else "x" * size
        for call in (
            api.users.GetCurrentUser(users_pb2.GetCurrentUserRequest(), metadata=bearer(token)),
            api.sessions.ListSessions(sessions_pb2.ListSessionsRequest(), metadata=bearer(token)),
        ):
            assert_error_info(await failure(call), UNAUTH, "TOKEN_INVALID")
        # A public RPC ignores the bearer: the transport let it through.
        assert (await api.auth.GetJwks(auth_pb2.GetJwksRequest(), metadata=bearer(token))).keys


@pytest.mark.parametrize("size", [8 * KB, 64 * KB])
async def test_an_oversized_api_key_is_api_key_invalid(api: Api, size: int) -> None:
    for _ in range(5):
        error = await failure(
            api.users.ListUsers(users_pb2.ListUsersRequest(), metadata=(("x-api-key", "k" * size),))
        )
        assert_error_info(error, UNAUTH, "API_KEY_INVALID")


def _padded(api: Api, real: str, length: int) -> str | None:
    """A token signed with the server's active key, with the claims of
    ``real`` plus padding (in a claim and a header field) so that it is
    exactly ``length`` characters long; None if ``length`` is too short."""
    key = api.server.core.keys.active
    assert key.private is not None
    claims = jwt.decode(real, options={"verify_signature": False})
    for header_pad in range(4):
        for claim_pad in range(length):
            token = jwt.encode(
                {**claims, "pad": "p" * claim_pad},
                key.private,
                algorithm="EdDSA",
                headers={"kid": key.kid, "pad": "h" * header_pad},
            )
            if len(token) == length:
                remember(token)
                return token
            if len(token) > length:
                break
    return None


async def test_a_genuine_token_at_the_bound_works_and_one_char_longer_does_not(
    api: Api,
) -> None:
    """The bound is the longest token authsvc can issue (every claim at its
    widest, with the configured issuer and audience) plus a margin: a token
    signed by the server is honoured up to exactly that length, and refused
    unparsed one character beyond it, in metadata and in a request body."""
    created = await api.sign_up()
    real = created.tokens.access_token
    bound = max_token_length(api)
    assert len(real) < bound < 2 * KB
    me = await api.users.GetCurrentUser(users_pb2.GetCurrentUserRequest(), metadata=bearer(real))
    assert me.user.id == created.user.id

    at_bound = _padded(api, real, bound)
    over = _padded(api, real, bound + 1)
    assert at_bound is not None
    assert over is not None
    me = await api.users.GetCurrentUser(
        users_pb2.GetCurrentUserRequest(), metadata=bearer(at_bound)
    )
    assert me.user.id == created.user.id
    who = await api.auth.Authenticate(auth_pb2.AuthenticateRequest(access_token=at_bound))
    assert who.session.user_id == created.user.id

    for _ in range(20):
        error = await failure(
            api.users.GetCurrentUser(users_pb2.GetCurrentUserRequest(), metadata=bearer(over))
        )
        assert_error_info(error, UNAUTH, "TOKEN_INVALID")
    error = await failure(api.auth.Authenticate(auth_pb2.AuthenticateRequest(access_token=over)))
    assert_error_info(error, UNAUTH, "TOKEN_INVALID")
    junk = "a" * (bound + 1)
    for call in (
        api.users.GetCurrentUser(users_pb2.GetCurrentUserRequest(), metadata=bearer(junk)),
        api.auth.Authenticate(auth_pb2.AuthenticateRequest(access_token=junk)),
        api.auth.Authenticate(auth_pb2.AuthenticateRequest(access_token="a" * (3 * KB * KB))),
    ):
        assert_error_info(await failure(call), UNAUTH, "TOKEN_INVALID")


async def test_a_long_configured_issuer_raises_the_bound(
    backend_urls: Backend, log_file: Path, tmp_path: Path
) -> None:
    """The bound follows the configuration: with a 5,000-character issuer
    and audience, tokens are over 13 KB and still work, in metadata too."""
    api = await start_api(backend_urls, tmp_path, issuer="i" * 5000, audience="\u00e9" * 1000)
    try:
        created = await api.sign_up()
        token = created.tokens.access_token
        assert len(token) > 13 * KB
        assert len(token) <= max_token_length(api)
        me = await api.users.GetCurrentUser(
            users_pb2.GetCurrentUserRequest(), metadata=bearer(token)
        )
        assert me.user.id == created.user.id
        who = await api.auth.Authenticate(auth_pb2.AuthenticateRequest(access_token=token))
        assert who.session.user_id == created.user.id
    finally:
        await stop_api(api)


# -- errors that echo input stay small -------------------------------------------

ECHOED = [
    pytest.param("\x00" * 2048, id="2048-nul"),
    pytest.param("\u00e9" * 1500, id="1500-e-acute"),
    pytest.param("a" * 5000, id="5000-a"),
    pytest.param("\U0001f600" * 3000, id="3000-emoji"),
]


def _assert_small(error: AuthsvcError) -> None:
    assert len(error.message.encode()) <= 512
    bad_request = error.detail(error_details_pb2.BadRequest)
    assert bad_request is not None
    assert [v.field for v in bad_request.field_violations] == ["update_mask"]
    for v in bad_request.field_violations:
        assert len(v.description.encode()) <= 512


@pytest.mark.parametrize("path", ECHOED)
async def test_update_user_with_a_huge_unknown_mask_path(api: Api, path: str) -> None:
    """A user's own token is enough: the answer is INVALID_ARGUMENT with its
    ErrorInfo and a short message, not RESOURCE_EXHAUSTED from the client's
    metadata limit."""
    created = await api.sign_up()
    request = users_pb2.UpdateUserRequest(
        user=resources_pb2.User(id=created.user.id, display_name="New"),
        update_mask=FieldMask(paths=[path]),
    )
    error = await failure(
        api.users.UpdateUser(request, metadata=bearer(created.tokens.access_token))
    )
    assert_error_info(error, IA, "INVALID_ARGUMENT")
    _assert_small(error)


@pytest.mark.parametrize("path", ECHOED)
async def test_update_org_with_a_huge_unknown_mask_path(api: Api, path: str) -> None:
    org, owner = await org_with_owner(api)
    request = orgs_pb2.UpdateOrgRequest(
        org_id=org.id,
        values=resources_pb2.Org(name="New"),
        update_mask=FieldMask(paths=["name", path]),
    )
    for metadata in (owner.md, service()):
        error = await failure(api.orgs.UpdateOrg(request, metadata=metadata))
        assert_error_info(error, IA, "INVALID_ARGUMENT")
        _assert_small(error)


def _wire_size(status: grpc.Status) -> int:
    """Bytes of the trailers as sent: grpc-status, grpc-message
    (percent-encoded) and grpc-status-details-bin (base64), with HPACK's
    32 bytes of accounting per entry."""
    size = 0
    message = quote(status.details, safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~", encoding="utf-8")
    size += len("grpc-status") + len(str(status.code.value[0])) + 32
    size += len("grpc-message") + len(message) + 32
    for key, value in status.trailing_metadata:
        raw = value if isinstance(value, bytes) else value.encode()
        size += len(key) + math.ceil(len(raw) / 3) * 4 + 32
    return size


@pytest.mark.parametrize(
    "text", ["\x00" * 100_000, "\u00e9" * 100_000, "\U0001f600" * 100_000, "a" * 1_000_000]
)
def test_the_status_of_any_error_stays_far_below_the_metadata_limit(text: str) -> None:
    """Whatever an error echoes, in its message, its metadata or in any
    number of field violations, the status's trailers stay under half the
    default client limit; cut strings end in an ellipsis on a whole
    character."""
    error = AuthError(
        text,
        metadata={text[:1000] + str(i): text for i in range(100)},
        violations=[FieldViolation(text, text) for _ in range(100)],
        retry_after=3.5,
    )
    status = to_status(error, "r" * 128)
    assert _wire_size(status) < CLIENT_METADATA_LIMIT // 2
    [(_, details)] = status.trailing_metadata
    decoded = status_pb2.Status.FromString(details)
    assert decoded.message.endswith("\u2026")
    assert decoded.message[:-1] == text[: len(decoded.message) - 1]
    info = error_details_pb2.ErrorInfo()
    assert decoded.details[0].Unpack(info)
    assert info.metadata["request_id"] == "r" * 128
    assert info.reason == "INTERNAL"


def test_a_short_error_is_unchanged() -> None:
    error = InvalidArgument.field("user_id", "not a UUID")
    status = to_status(error, "rid")
    assert status.details == "user_id: not a UUID"
    decoded = status_pb2.Status.FromString(status.trailing_metadata[0][1])
    bad_request = error_details_pb2.BadRequest()
    assert decoded.details[1].Unpack(bad_request)
    assert [(v.field, v.description) for v in bad_request.field_violations] == [
        ("user_id", "not a UUID")
    ]


# -- request ids ---------------------------------------------------------------------


class _Call:
    """The two things ``EdgeInterceptor._begin`` reads from a call's context."""

    def __init__(self, metadata: Metadata) -> None:
        self._metadata = metadata

    def invocation_metadata(self) -> Metadata:
        return self._metadata

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"


def _request_id(value: str) -> str:
    edge = EdgeInterceptor({}, _never, _no_keys())
    request_id, _, _, _ = edge._begin(_Call((("x-request-id", value),)))  # type: ignore[arg-type]
    return request_id


async def _never(_: str) -> Any:
    raise AssertionError("not called")


def _no_keys() -> Any:
    from authsvc.api.edge import ApiKeys

    return ApiKeys("")


@pytest.mark.parametrize(
    "value",
    ["abc\n", "abc\r\n", "\nabc", "abc\x00", "a b", "a" * 129, "", "abc\u00e9", "\u0661\u0662"],
)
def test_a_request_id_that_is_not_allowed_is_replaced(value: str) -> None:
    """Not echoed nor logged: a fresh id is used instead. (A newline cannot
    be sent through grpc's own clients, which refuse such a header value;
    other HTTP/2 clients can, so the edge checks the whole value.)"""
    replaced = _request_id(value)
    assert replaced != value
    assert len(replaced) == 32
    int(replaced, 16)


@pytest.mark.parametrize(
    "value", ["abc", "A.b_c:d-1", "x" * 128, "6e5bd0a1-5c1c-4f9b-a7a2-3f0e2d9c8b71"]
)
def test_an_allowed_request_id_is_kept(value: str) -> None:
    assert _request_id(value) == value


async def test_request_ids_through_the_server(api: Api, log_file: Path) -> None:
    """Kept when allowed, replaced when not, in the error and in the log."""
    kept = f"edge-{uuid.uuid4().hex}"
    error = await failure(
        api.users.GetCurrentUser(
            users_pb2.GetCurrentUserRequest(), metadata=(("x-request-id", kept),)
        )
    )
    assert error.request_id == kept
    for bad in (f"edge {uuid.uuid4().hex}", "r" * 129):
        error = await failure(
            api.users.GetCurrentUser(
                users_pb2.GetCurrentUserRequest(), metadata=(("x-request-id", bad),)
            )
        )
        assert error.request_id != bad
        assert len(error.request_id) == 32
        logged = await _access_line(log_file, error.request_id)
        assert logged["request_id"] == error.request_id
        assert bad not in _log_text(log_file)


def _log_text(log_file: Path) -> str:
    return log_file.read_text()


async def _access_line(log_file: Path, request_id: str) -> dict[str, Any]:
    """The server's access-log line of one call (written after the status went out)."""
    for _ in range(100):
        for line in _log_text(log_file).splitlines():
            if request_id in line:
                event = json.loads(line)
                if event.get("event") == "rpc":
                    return dict(event)
        await asyncio.sleep(0.02)
    raise AssertionError(f"no access-log line for {request_id}")


# -- ids are canonical UUIDs ---------------------------------------------------------


def _spellings(value: str) -> list[tuple[str, str]]:
    """Ways ``uuid.UUID()`` accepts that are not the canonical text of an id
    (some name ``value``, some another id)."""
    hex32 = value.replace("-", "")
    moved = f"{hex32[:7]}-{hex32[7:12]}-{hex32[12:17]}-{hex32[17:22]}-{hex32[22:]}"
    fullwidth = chr(0xFF10 + int(value[0], 16)) + value[1:] if value[0].isdigit() else None
    out = [
        ("no-hyphens", hex32),
        ("moved-hyphens", moved),
        ("braces", "{" + value + "}"),
        ("braces-no-hyphens", "{" + hex32 + "}"),
        ("urn", "urn:uuid:" + value),
        ("plus", "+" + value[1:]),
        ("underscore", value[0] + "_" + value[2:]),
        ("trailing-newline", hex32 + "\n"),
        ("leading-space", " " + hex32),
        ("arabic-digit", "\u0661" + value[1:]),
    ]
    if fullwidth:
        out.append(("fullwidth-digit", fullwidth))
    return out


async def test_ids_must_be_canonical_uuids(api: Api) -> None:
    """Every request id field takes the canonical 8-4-4-4-12 text only (in
    any case); each other spelling is INVALID_ARGUMENT naming the field."""
    org, owner = await org_with_owner(api)
    user = owner.id
    session = owner.tokens.session_id
    requests: list[tuple[str, Any, Any, str]] = []
    for name, text in _spellings(user):
        requests += [
            (name, api.users.GetUser, users_pb2.GetUserRequest(user_id=text), "user_id"),
            (
                name,
                api.sessions.ListSessions,
                sessions_pb2.ListSessionsRequest(user_id=text),
                "user_id",
            ),
            (
                name,
                api.orgs.GetMember,
                orgs_pb2.GetMemberRequest(org_id=org.id, user_id=text),
                "user_id",
            ),
        ]
    for name, text in _spellings(session):
        requests.append(
            (
                name,
                api.sessions.RevokeSession,
                sessions_pb2.RevokeSessionRequest(session_id=text),
                "session_id",
            )
        )
    for name, text in _spellings(org.id):
        requests += [
            (name, api.orgs.GetOrg, orgs_pb2.GetOrgRequest(org_id=text), "org_id"),
            (name, api.orgs.ListMembers, orgs_pb2.ListMembersRequest(org_id=text), "org_id"),
        ]
    for name, method, request, field in requests:
        error = await failure(method(request, metadata=service()))
        assert (error.code, error.reason) == (IA, "INVALID_ARGUMENT"), (name, error.message)
        bad_request = error.detail(error_details_pb2.BadRequest)
        assert bad_request is not None
        assert [v.field for v in bad_request.field_violations] == [field], name
    # SetActiveOrg names the org in its body: the same rule, before the
    # refresh token is spent.
    for name, text in _spellings(org.id):
        error = await failure(
            api.auth.SetActiveOrg(
                auth_pb2.SetActiveOrgRequest(refresh_token=owner.tokens.refresh_token, org_id=text)
            )
        )
        assert (error.code, error.reason) == (IA, "INVALID_ARGUMENT"), (name, error.message)

    # The org's slug in place of its id is no id either.
    for call in (
        api.orgs.GetOrg(orgs_pb2.GetOrgRequest(org_id=org.slug), metadata=service()),
        api.orgs.GetMember(
            orgs_pb2.GetMemberRequest(org_id=org.slug, user_id=user), metadata=service()
        ),
    ):
        error = await failure(call)
        assert (error.code, error.reason) == (IA, "INVALID_ARGUMENT"), error.message

    # Any case of the canonical text is the same id.
    got = await api.users.GetUser(users_pb2.GetUserRequest(user_id=user.upper()), metadata=owner.md)
    assert got.user.id == user
    got_org = await api.orgs.GetOrg(
        orgs_pb2.GetOrgRequest(org_id=org.id.upper()), metadata=owner.md
    )
    assert got_org.org.id == org.id
    member = await api.orgs.GetMember(
        orgs_pb2.GetMemberRequest(org_id=org.id.upper(), user_id=user.upper()), metadata=service()
    )
    assert member.member.user_id == user


async def test_ids_of_the_user_setters_must_be_canonical_uuids(api: Api) -> None:
    """SetUserRole and SetUserEmail: each other spelling of the user's id is
    INVALID_ARGUMENT naming ``user_id``, and changes nothing."""
    created = await api.sign_up()
    user = created.user.id
    before = await api.snapshot()
    named: set[str] = set()
    for name, text in _spellings(user):
        for call in (
            api.users.SetUserRole(
                users_pb2.SetUserRoleRequest(user_id=text, role=resources_pb2.ROLE_ADMIN),
                metadata=service(),
            ),
            api.users.SetUserEmail(
                users_pb2.SetUserEmailRequest(user_id=text, email="moved@example.com"),
                metadata=service(),
            ),
        ):
            error = await failure(call)
            assert (error.code, error.reason) == (IA, "INVALID_ARGUMENT"), (name, error.message)
            bad_request = error.detail(error_details_pb2.BadRequest)
            assert bad_request is not None
            named |= {v.field for v in bad_request.field_violations}
    assert await api.snapshot() == before
    got = await api.users.SetUserRole(
        users_pb2.SetUserRoleRequest(user_id=user.upper(), role=resources_pb2.ROLE_ADMIN),
        metadata=service(),
    )
    assert (got.user.id, got.user.role) == (user, resources_pb2.ROLE_ADMIN)
    assert named == {"user_id"}


# -- one credential header of each kind -------------------------------------------


async def test_two_authorization_headers_are_refused(api: Api) -> None:
    created = await api.sign_up()
    good = f"Bearer {created.tokens.access_token}"
    for pair in ((good, good), (good, "Bearer junk"), ("Bearer junk", good)):
        metadata = (("authorization", pair[0]), ("authorization", pair[1]))
        # (Not on a public method, which ignores a bearer.)
        for call in (
            api.users.GetCurrentUser(users_pb2.GetCurrentUserRequest(), metadata=metadata),
            api.users.ListUsers(
                users_pb2.ListUsersRequest(), metadata=(*metadata, ("x-api-key", API_KEY))
            ),
        ):
            error = await failure(call)
            assert_error_info(error, UNAUTH, "TOKEN_INVALID")
            assert "only one authorization header" in error.message
        # A public RPC ignores the bearer, however many.
        assert (await api.auth.GetJwks(auth_pb2.GetJwksRequest(), metadata=metadata)).keys
    # One of each kind is fine.
    listed = await api.users.ListUsers(
        users_pb2.ListUsersRequest(), metadata=(("authorization", good), ("x-api-key", API_KEY))
    )
    assert [u.id for u in listed.users] == [created.user.id]


async def test_two_api_key_headers_are_refused(api: Api) -> None:
    """On every method: a public one checks an API key too."""
    for pair in ((API_KEY, API_KEY), (API_KEY, "ak_wrong"), ("ak_wrong", API_KEY)):
        metadata = (("x-api-key", pair[0]), ("x-api-key", pair[1]))
        for call in (
            api.users.ListUsers(users_pb2.ListUsersRequest(), metadata=metadata),
            api.auth.GetJwks(auth_pb2.GetJwksRequest(), metadata=metadata),
        ):
            error = await failure(call)
            assert_error_info(error, UNAUTH, "API_KEY_INVALID")
            assert "only one x-api-key header" in error.message
