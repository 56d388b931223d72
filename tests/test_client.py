"""``authsvc_client.client.AuthsvcClient`` against a real authsvc, and the typed errors.

Every method of the client is called here over a real channel; every failure
is checked as the typed exception of its reason, chained to the
``grpc.aio.AioRpcError`` it came from. How the client reads a sign-in that
answers a challenge (which this server never does yet) is checked against a
small AuthService of the test's own, over a real channel too.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2

from authsvc_client import errors
from authsvc_client.client import (
    AuthsvcClient,
    CursorResult,
    OrgMembership,
    SignedIn,
    SignInChallenge,
    SignInOutcome,
)
from authsvc_client.errors import (
    REASONS,
    AuthsvcError,
    EmailAlreadyExists,
    EtagMismatch,
    InvalidArgument,
    InvalidCredentials,
    InvalidPageToken,
    LastOwner,
    MemberAlreadyExists,
    MemberNotFound,
    NotAuthenticated,
    OrgHasMembers,
    OrgMismatch,
    OrgNotFound,
    OrgSlugConflict,
    PendingTokenInvalid,
    PermissionDenied,
    RefreshTokenReused,
    SessionNotFound,
    SessionRevoked,
    TokenInvalid,
    UserNotFound,
    WeakPassword,
    from_rpc_error,
    status_metadata,
)
from authsvc_client.v1 import auth_pb2, resources_pb2
from tests.app import (
    API_KEY,
    NO_GRACE,
    PASSWORD,
    Api,
    Backend,
    new_slug,
    remember,
    start_api,
    stop_api,
)

ROOT = Path(__file__).resolve().parent.parent


def _email() -> str:
    return f"client-{uuid.uuid4().hex[:12]}@example.com"


def _remember(result: SignedIn | Any) -> None:
    tokens = result.tokens if isinstance(result, SignedIn) else result
    remember(tokens.access_token, tokens.refresh_token)


def signed_in(outcome: SignInOutcome) -> SignedIn:
    """The tokens of a sign-in that must not answer a challenge (this server
    issues none yet); remembered as secrets."""
    assert isinstance(outcome, SignedIn), f"a challenge: {outcome}"
    _remember(outcome)
    return outcome


@pytest.fixture
async def client(api: Api) -> AsyncIterator[AuthsvcClient]:
    """No default credential: each test says which one a call uses."""
    async with AuthsvcClient(api.target) as made:
        yield made


@pytest.fixture
async def service(api: Api) -> AsyncIterator[AuthsvcClient]:
    """A client with the service API key."""
    async with AuthsvcClient(api.target, api_key=API_KEY) as made:
        yield made


async def _user(client: AuthsvcClient, **fields: Any) -> SignedIn:
    return signed_in(await client.sign_up(email=_email(), password=PASSWORD, **fields))


# -- the error classes ----------------------------------------------------------


def _declared_codes() -> dict[str, str]:
    """reason -> the status code errors.proto says it travels with (its comment's first word)."""
    text = (ROOT / "protos/authsvc/v1/errors.proto").read_text()
    pairs = re.findall(r"//\s*([A-Z_]+):[^\n]*\n(?:\s*//[^\n]*\n)*\s*ERROR_REASON_(\w+)\s*=", text)
    return {reason: code for code, reason in pairs}


def test_every_reason_has_its_own_error_class_with_the_declared_code() -> None:
    registry = AuthsvcError.registry
    assert set(registry) == set(REASONS)
    declared = _declared_codes()
    assert set(declared) == set(REASONS)
    for reason, cls in registry.items():
        assert issubclass(cls, AuthsvcError)
        assert cls is not AuthsvcError
        assert reason == cls.REASON
        assert cls.CODE.name == declared[reason], reason
        # the class is exported under its CamelCase name
        name = "".join(part.capitalize() for part in reason.split("_"))
        assert getattr(errors, name) is cls
        assert errors.error_class(reason) is cls
    assert errors.error_class("SOMETHING_NEWER") is AuthsvcError


def _rpc_error(code: grpc.StatusCode, trailers: Any = ()) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(
        code,
        initial_metadata=grpc.aio.Metadata(),
        trailing_metadata=grpc.aio.Metadata(*trailers),
        details="a message",
    )


@pytest.mark.parametrize("reason", sorted(REASONS))
def test_from_rpc_error_returns_the_class_of_the_reason(reason: str) -> None:
    cls = AuthsvcError.registry[reason]
    error = from_rpc_error(
        _rpc_error(cls.CODE, status_metadata(cls.CODE, reason, "m", {"request_id": "r1"}))
    )
    assert type(error) is cls
    assert (error.code, error.reason, error.message, error.request_id) == (
        cls.CODE,
        reason,
        "a message",
        "r1",
    )


def test_from_rpc_error_without_a_known_reason_is_the_base_class() -> None:
    bare = from_rpc_error(_rpc_error(grpc.StatusCode.UNAVAILABLE))
    assert type(bare) is AuthsvcError
    assert (bare.code, bare.reason) == (grpc.StatusCode.UNAVAILABLE, "")
    newer = grpc.StatusCode.FAILED_PRECONDITION
    future = from_rpc_error(_rpc_error(newer, status_metadata(newer, "NEWER_REASON", "m")))
    assert type(future) is AuthsvcError
    assert future.reason == "NEWER_REASON"


def test_an_error_class_built_directly_takes_its_own_code_and_reason() -> None:
    error = OrgMismatch(message="not your org")
    assert (error.code, error.reason, error.message) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "ORG_MISMATCH",
        "not your org",
    )
    assert str(error) == "ORG_MISMATCH: not your org"
    assert (error.metadata, error.details) == ({}, [])


# -- sign-up, sign-in, tokens ---------------------------------------------------


async def test_sign_up_sign_in_refresh_authenticate_and_sign_out(
    api: Api, client: AuthsvcClient
) -> None:
    email = _email()
    up = signed_in(await client.sign_up(email=email, password=PASSWORD, display_name="Ada"))
    assert (up.user.email, up.user.display_name, up.user.role) == (
        email,
        "Ada",
        resources_pb2.ROLE_USER,
    )
    assert up.tokens.token_type == "Bearer"

    signed = signed_in(await client.sign_in_with_password(email.upper(), PASSWORD))
    assert signed.user.id == up.user.id
    assert signed.tokens.session_id != up.tokens.session_id

    refreshed = await client.refresh_token(signed.tokens.refresh_token)
    _remember(refreshed)
    assert refreshed.session_id == signed.tokens.session_id

    who = await client.authenticate(refreshed.access_token)
    assert (who.user_id, who.session_id, who.email) == (up.user.id, refreshed.session_id, email)

    me = await client.get_current_user(access_token=refreshed.access_token)
    assert me.id == up.user.id

    # The spent refresh token, after the grace interval, revokes the session.
    await client.sign_out(access_token=refreshed.access_token)
    with pytest.raises(SessionRevoked) as raised:
        await client.authenticate(refreshed.access_token)
    assert isinstance(raised.value.__cause__, grpc.aio.AioRpcError)
    assert raised.value.request_id
    # The first session is untouched.
    assert (await client.authenticate(up.tokens.access_token)).session_id == up.tokens.session_id


async def test_names_at_sign_up_and_sign_in(api: Api, client: AuthsvcClient) -> None:
    up = await _user(client, given_name="Ada", family_name="Lovelace")
    assert (up.user.given_name, up.user.family_name) == ("Ada", "Lovelace")
    # At sign-in, names fill in only what is still empty.
    bare = await _user(client)
    signed = signed_in(
        await client.sign_in_with_password(
            bare.user.email, PASSWORD, given_name="Grace", family_name="Hopper"
        )
    )
    assert (signed.user.given_name, signed.user.family_name) == ("Grace", "Hopper")
    again = signed_in(
        await client.sign_in_with_password(up.user.email, PASSWORD, given_name="Augusta")
    )
    assert (again.user.given_name, again.user.family_name) == ("Ada", "Lovelace")


async def test_sign_in_sends_the_api_key_and_never_the_token(api: Api) -> None:
    """Sign-ups and sign-ins carry their credential in the request: the client
    sends the API key (which lets a gateway pass ClientInfo), not its token."""
    async with AuthsvcClient(api.target, api_key=API_KEY) as bootstrap:
        holder = await _user(bootstrap)
    async with AuthsvcClient(
        api.target, api_key=API_KEY, access_token=holder.tokens.access_token
    ) as gateway:
        up = await _user(gateway, user_agent="gateway-ua/0")
        sessions = await gateway.list_sessions(user_id=up.user.id, access_token="")
        # Honoured: the call carried the API key, not the default token.
        assert [s.user_agent for s in sessions] == ["gateway-ua/0"]


async def test_complete_sign_in_with_a_pending_token_this_server_never_issued(
    api: Api, client: AuthsvcClient
) -> None:
    # No sign-in answers a challenge yet: every pending token is refused.
    for proof in ({}, {"new_password": PASSWORD + "!"}):
        with pytest.raises(PendingTokenInvalid) as raised:
            await client.complete_sign_in("pt_" + "x" * 40, **proof)
        assert raised.value.code == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(InvalidArgument):
        await client.complete_sign_in("")


async def test_gateway_sign_in_with_client_info(api: Api, service: AuthsvcClient) -> None:
    up = await _user(service, user_agent="gateway-ua/1", ip_address="203.0.113.7")
    signed = signed_in(
        await service.sign_in_with_password(
            up.user.email, PASSWORD, user_agent="gateway-ua/2", ip_address="203.0.113.8"
        )
    )
    sessions = {s.id: s for s in await service.list_sessions(user_id=up.user.id)}
    assert (
        sessions[up.tokens.session_id].user_agent,
        sessions[up.tokens.session_id].ip_address,
    ) == (
        "gateway-ua/1",
        "203.0.113.7",
    )
    assert sessions[signed.tokens.session_id].ip_address == "203.0.113.8"
    refreshed = await service.refresh_token(
        signed.tokens.refresh_token, user_agent="gateway-ua/3", ip_address="203.0.113.9"
    )
    _remember(refreshed)
    sessions = {s.id: s for s in await service.list_sessions(user_id=up.user.id)}
    assert sessions[signed.tokens.session_id].user_agent == "gateway-ua/3"


async def test_typed_errors_of_sign_up_sign_in_and_tokens(api: Api, client: AuthsvcClient) -> None:
    up = await _user(client)
    with pytest.raises(EmailAlreadyExists):
        await client.sign_up(email=up.user.email, password=PASSWORD)
    with pytest.raises(WeakPassword):
        await client.sign_up(email=_email(), password="short")
    with pytest.raises(InvalidArgument) as raised:
        await client.sign_up(email="not an email", password=PASSWORD)
    bad_request = raised.value.detail(error_details_pb2.BadRequest)
    assert bad_request is not None
    assert [v.field for v in bad_request.field_violations] == ["email"]
    with pytest.raises(InvalidCredentials):
        await client.sign_in_with_password(up.user.email, PASSWORD + "x")
    with pytest.raises(InvalidCredentials):
        await client.sign_in_with_password(_email(), PASSWORD)
    with pytest.raises(TokenInvalid):
        await client.authenticate("not-a-token")
    with pytest.raises(TokenInvalid):
        await client.refresh_token("rt_not-a-refresh-token")
    with pytest.raises(NotAuthenticated):
        await client.get_current_user()
    with pytest.raises(errors.ApiKeyInvalid):
        await AuthsvcClient(client.channel, api_key="ak_wrong").count_users()


async def test_refresh_token_reuse_is_typed(own_server: Callable[..., Awaitable[Api]]) -> None:
    # Reusing a spent refresh token after the grace interval revokes the
    # session: on a server without one, so there is none to wait out.
    api = await own_server(**NO_GRACE)
    async with AuthsvcClient(api.target) as client:
        up = await _user(client)
        first = await client.refresh_token(up.tokens.refresh_token)
        _remember(first)
        second = await client.refresh_token(first.refresh_token)
        _remember(second)
        with pytest.raises(RefreshTokenReused) as raised:
            await client.refresh_token(up.tokens.refresh_token)
        assert raised.value.code == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(SessionRevoked):
            await client.authenticate(second.access_token)


async def test_get_jwks_has_the_key_of_every_token(api: Api, client: AuthsvcClient) -> None:
    up = await _user(client)
    jwks = await client.get_jwks()
    kids = {k["kid"] for k in jwks["keys"]}
    assert jwt.get_unverified_header(up.tokens.access_token)["kid"] in kids
    key = jwt.PyJWKSet.from_dict(jwks)[jwt.get_unverified_header(up.tokens.access_token)["kid"]]
    claims = jwt.decode(up.tokens.access_token, key.key, algorithms=["EdDSA"], audience="authsvc")
    assert claims["sub"] == up.user.id


# -- sign-in outcomes: a server that answers challenges ---------------------------

PENDING = "pt_test_pending_token_0123456789abcdef"
#: A SignInRequirement newer than this client.
NEWER_REQUIREMENT = resources_pb2.SignInRequirement.ValueType(99)
CHALLENGED = "challenged@example.com"


class _Challenging:
    """An AuthService that answers the shapes this authsvc does not yet: a
    challenge to one email, tokens once it is completed with a new password,
    and (to another) an outcome of a kind newer than the client."""

    def __init__(self) -> None:
        self.completions: list[auth_pb2.CompleteSignInRequest] = []

    @staticmethod
    def _result(email: str) -> resources_pb2.SignInResult:
        if email == CHALLENGED:
            return resources_pb2.SignInResult(
                challenge=resources_pb2.SignInChallenge(
                    pending_token=PENDING,
                    requirements=[
                        resources_pb2.SIGN_IN_REQUIREMENT_PASSWORD_CHANGE,
                        NEWER_REQUIREMENT,
                    ],
                    expire_time=Timestamp(seconds=2_000_000_000),
                )
            )
        if email == "newer@example.com":
            return resources_pb2.SignInResult()  # neither outcome this client knows
        return resources_pb2.SignInResult(
            user=resources_pb2.User(id=str(uuid.UUID(int=1)), email=email),
            tokens=resources_pb2.TokenPair(access_token="at", session_id="s1"),
        )

    async def SignUp(self, request: Any, context: Any) -> auth_pb2.SignUpResponse:
        return auth_pb2.SignUpResponse(result=self._result(request.email))

    async def SignInWithPassword(
        self, request: Any, context: Any
    ) -> auth_pb2.SignInWithPasswordResponse:
        return auth_pb2.SignInWithPasswordResponse(result=self._result(request.email))

    async def CompleteSignIn(self, request: Any, context: Any) -> auth_pb2.CompleteSignInResponse:
        self.completions.append(request)
        return auth_pb2.CompleteSignInResponse(result=self._result("done@example.com"))

    def handler(self) -> grpc.GenericRpcHandler:
        """The three sign-in methods of authsvc.v1.AuthService."""
        methods: dict[str, tuple[Any, Any]] = {
            "SignUp": (self.SignUp, auth_pb2.SignUpRequest),
            "SignInWithPassword": (self.SignInWithPassword, auth_pb2.SignInWithPasswordRequest),
            "CompleteSignIn": (self.CompleteSignIn, auth_pb2.CompleteSignInRequest),
        }
        return grpc.method_handlers_generic_handler(
            "authsvc.v1.AuthService",
            {
                name: grpc.unary_unary_rpc_method_handler(
                    method,
                    request_deserializer=request.FromString,
                    response_serializer=lambda response: response.SerializeToString(),
                )
                for name, (method, request) in methods.items()
            },
        )


async def test_a_challenge_is_its_own_outcome_and_complete_sign_in_finishes_it() -> None:
    servicer = _Challenging()
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((servicer.handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with AuthsvcClient(f"127.0.0.1:{port}") as client:
            for outcome in (
                await client.sign_in_with_password(CHALLENGED, PASSWORD),
                await client.sign_up(email=CHALLENGED, password=PASSWORD),
            ):
                assert isinstance(outcome, SignInChallenge)
                assert not hasattr(outcome, "tokens")  # nothing to sign in half-way with
                assert outcome.pending_token == PENDING
                # Known and unknown requirements alike, by value.
                assert outcome.requirements == (
                    resources_pb2.SIGN_IN_REQUIREMENT_PASSWORD_CHANGE,
                    NEWER_REQUIREMENT,
                )
                assert outcome.expire_time == dt.datetime.fromtimestamp(2_000_000_000, dt.UTC)

            done = await client.complete_sign_in(PENDING, new_password="a new password 1")
            assert isinstance(done, SignedIn)
            assert done.tokens.session_id == "s1"
            [sent] = servicer.completions
            assert (sent.pending_token, sent.WhichOneof("proof"), sent.new_password) == (
                PENDING,
                "new_password",
                "a new password 1",
            )
            plain = await client.sign_in_with_password("someone@example.com", PASSWORD)
            assert isinstance(plain, SignedIn)
            assert plain.user.email == "someone@example.com"

            # An outcome newer than the client: an error, never a silent sign-in.
            with pytest.raises(AuthsvcError) as raised:
                await client.sign_in_with_password("newer@example.com", PASSWORD)
            assert (raised.value.code, raised.value.reason) == (grpc.StatusCode.UNKNOWN, "")
    finally:
        await server.stop(0)


# -- users ----------------------------------------------------------------------


async def test_users_with_the_api_key(api: Api, service: AuthsvcClient) -> None:
    made = [await _user(service) for _ in range(5)]
    ids = [m.user.id for m in made]

    assert (await service.get_user(ids[0])).email == made[0].user.email
    assert (await service.get_user(uuid.UUID(ids[1]))).id == ids[1]
    with pytest.raises(UserNotFound):
        await service.get_user(uuid.uuid4())

    # Oldest first; the iterator follows the cursor across pages of 2.
    assert [u.id async for u in service.iter_users(page_size=2)] == ids
    assert [u.id for u in await service.list_users()] == ids
    assert [u.id for u in await service.list_users(limit=3)] == ids[:3]

    pages: list[CursorResult[Any]] = []
    after = None
    while True:
        page = await service.list_users_by_cursor(limit=2, after=after)
        pages.append(page)
        after = page.next_cursor
        if after is None:
            break
    assert [len(p.items) for p in pages] == [2, 2, 1]
    assert [u.id for p in pages for u in p.items] == ids
    with pytest.raises(InvalidPageToken):
        await service.list_users_by_cursor(after="garbage")

    updated = await service.update_user(user_id=ids[0], display_name="Grace")
    assert updated.display_name == "Grace"
    promoted = await service.set_user_role(ids[0], "admin")
    assert (promoted.display_name, promoted.role) == ("Grace", resources_pb2.ROLE_ADMIN)
    assert [u.id for u in await service.list_users(role="admin")] == [ids[0]]
    assert [u.id async for u in service.iter_users(role=resources_pb2.ROLE_ADMIN)] == [ids[0]]
    assert await service.count_users() == 5
    assert await service.count_users(role="admin") == 1
    assert await service.count_users(role=resources_pb2.ROLE_USER) == 4
    prefix = made[2].user.email[:14]
    assert [u.id for u in await service.list_users(email_prefix=prefix)] == [ids[2]]
    email = _email()
    assert (await service.set_user_email(ids[1], email)).email == email
    with pytest.raises(EmailAlreadyExists):
        await service.set_user_email(uuid.UUID(ids[2]), email)
    with pytest.raises(UserNotFound):
        await service.set_user_email(uuid.uuid4(), _email())
    with pytest.raises(UserNotFound):
        await service.set_user_role(uuid.uuid4(), "user")
    with pytest.raises(UserNotFound):
        await service.update_user(user_id=uuid.uuid4(), display_name="x")
    with pytest.raises(InvalidArgument):
        await service.update_user(user_id=ids[1])  # nothing to change: an empty mask

    await service.delete_user(ids[4])
    with pytest.raises(UserNotFound):
        await service.delete_user(ids[4])
    assert await service.count_users() == 4


async def test_user_names_etags_and_allow_missing(api: Api, service: AuthsvcClient) -> None:
    user = (await _user(service)).user
    named = await service.update_user(user_id=user.id, given_name="Ada", family_name="Lovelace")
    assert (named.given_name, named.family_name) == ("Ada", "Lovelace")
    assert named.etag
    assert named.etag != user.etag
    # A stale etag: the change is refused, and nothing changes.
    for stale_call in (
        service.update_user(user_id=user.id, display_name="x", etag=user.etag),
        service.set_user_role(user.id, "admin", etag=user.etag),
        service.set_user_email(user.id, _email(), etag=user.etag),
        service.delete_user(user.id, etag=user.etag),
    ):
        with pytest.raises(EtagMismatch) as raised:
            await stale_call
        assert raised.value.code == grpc.StatusCode.ABORTED
    assert (await service.get_user(user.id)).etag == named.etag
    # The current etag: each change goes through and yields a new etag.
    renamed = await service.update_user(user_id=user.id, display_name="Ada L.", etag=named.etag)
    promoted = await service.set_user_role(user.id, "admin", etag=renamed.etag)
    moved = await service.set_user_email(user.id, _email(), etag=promoted.etag)
    assert len({named.etag, renamed.etag, promoted.etag, moved.etag}) == 4
    await service.delete_user(user.id, etag=moved.etag)
    # A retried delete with allow_missing is not an error; without, it is.
    await service.delete_user(user.id, allow_missing=True)
    with pytest.raises(UserNotFound):
        await service.delete_user(user.id)


async def test_users_with_a_users_token(api: Api, client: AuthsvcClient) -> None:
    alice, bob = await _user(client), await _user(client)
    as_alice = client.with_token(alice.tokens.access_token)
    assert (await as_alice.get_current_user()).id == alice.user.id
    assert (await as_alice.get_user(alice.user.id)).id == alice.user.id
    with pytest.raises(PermissionDenied):
        await as_alice.get_user(bob.user.id)
    assert (await as_alice.update_user(user_id=alice.user.id, display_name="A")).display_name == "A"
    for admin_only in (
        as_alice.set_user_role(alice.user.id, "admin"),
        as_alice.set_user_email(alice.user.id, _email()),
        as_alice.list_users(),
        as_alice.count_users(),
        as_alice.delete_user(bob.user.id),
    ):
        with pytest.raises(PermissionDenied):
            await admin_only
    # A per-call token overrides the client's.
    me = await as_alice.get_current_user(access_token=bob.tokens.access_token)
    assert me.id == bob.user.id


# -- sessions -------------------------------------------------------------------


async def test_sessions(api: Api, client: AuthsvcClient, service: AuthsvcClient) -> None:
    up = await _user(client)
    signed = [
        signed_in(await client.sign_in_with_password(up.user.email, PASSWORD)) for _ in range(4)
    ]
    newest_first = [s.tokens.session_id for s in reversed(signed)] + [up.tokens.session_id]
    token = signed[-1].tokens.access_token
    as_user = client.with_token(token)

    assert [s.id for s in await as_user.list_sessions()] == newest_first
    assert [s.id async for s in as_user.iter_sessions(page_size=2)] == newest_first
    assert [s.id for s in await as_user.list_sessions(limit=2)] == newest_first[:2]
    first = await as_user.list_sessions_by_cursor(limit=3)
    assert first.next_cursor is not None
    rest = await as_user.list_sessions_by_cursor(limit=3, after=first.next_cursor)
    assert rest.next_cursor is None
    assert [s.id for s in first.items + rest.items] == newest_first
    assert [s.current for s in first.items] == [True, False, False]
    assert [
        s.id async for s in service.iter_sessions(user_id=up.user.id, page_size=1)
    ] == newest_first

    # revoke_session and sign_out(session_id) revoke one session each.
    await as_user.revoke_session(newest_first[1])
    await as_user.sign_out(uuid.UUID(newest_first[2]))
    with pytest.raises(PermissionDenied):  # a user cannot probe for session ids
        await as_user.revoke_session(uuid.uuid4())
    with pytest.raises(SessionNotFound):
        await service.revoke_session(uuid.uuid4())
    remaining = [newest_first[0], *newest_first[3:]]
    assert [s.id for s in await as_user.list_sessions()] == remaining
    # sign_out_all: every live session of the caller, counted.
    assert await as_user.sign_out_all() == len(remaining)
    with pytest.raises(SessionRevoked):
        await as_user.list_sessions()

    other = await _user(client)
    signed_in(await client.sign_in_with_password(other.user.email, PASSWORD))
    assert await service.sign_out_all(other.user.id) == 2
    with pytest.raises(UserNotFound):
        await service.sign_out_all(uuid.uuid4())


# -- orgs and members -----------------------------------------------------------


async def _owner_of_new_org(client: AuthsvcClient, slug: str | None = None) -> tuple[Any, Any]:
    """A new user creates an org and makes it their active org. Returns (org, tokens)."""
    up = await _user(client)
    org = await client.create_org(
        name="Acme", slug=slug or new_slug(), access_token=up.tokens.access_token
    )
    tokens = await client.set_active_org(refresh_token=up.tokens.refresh_token, org_id=org.id)
    _remember(tokens)
    return org, tokens


async def test_orgs_as_their_owner(api: Api, client: AuthsvcClient) -> None:
    slug = new_slug()
    org, tokens = await _owner_of_new_org(client, slug)
    assert org.slug == slug
    owner = client.with_token(tokens.access_token)
    claims = jwt.decode(tokens.access_token, options={"verify_signature": False})
    assert (claims["org_id"], claims["org_slug"], claims["org_role"]) == (org.id, slug, "owner")

    assert (await owner.get_org(org_id=org.id)).slug == slug
    assert (await owner.get_org(org_id=uuid.UUID(org.id))).id == org.id
    assert (await owner.get_org(slug=slug)).id == org.id
    # Exactly one of org_id and slug: refused before anything is sent.
    for neither_or_both in ({}, {"org_id": org.id, "slug": slug}):
        for call in (
            owner.get_org,
            owner.update_org,
            owner.delete_org,
            owner.list_org_members,
            owner.list_org_members_by_cursor,
            owner.iter_org_members,
        ):
            with pytest.raises(ValueError, match="exactly one"):
                await _awaited(call(**neither_or_both))
        for member_call in (
            owner.add_org_member,
            owner.get_org_member,
            owner.remove_org_member,
        ):
            with pytest.raises(ValueError, match="exactly one"):
                await member_call(user_id=uuid.uuid4(), **neither_or_both)
    with pytest.raises(InvalidArgument):
        await owner.get_org(org_id="")  # named, but empty: the server's to refuse

    renamed = await owner.update_org(org_id=org.id, name="Acme Two")
    assert (renamed.name, renamed.slug) == ("Acme Two", slug)
    new = new_slug()
    moved = await owner.update_org(slug=slug, new_slug=new)
    assert (moved.name, moved.slug) == ("Acme Two", new)
    # The token still carries the old slug: refresh for the new one (the
    # rename is a claims change); by id, nothing changed.
    assert (await owner.get_org(org_id=org.id)).slug == new
    both = await owner.update_org(org_id=org.id, name="Acme Three", new_slug=slug)
    assert (both.name, both.slug) == ("Acme Three", slug)

    other, _ = await _owner_of_new_org(client)
    with pytest.raises(OrgSlugConflict):
        await owner.update_org(org_id=org.id, new_slug=other.slug)
    with pytest.raises(OrgSlugConflict):
        await client.create_org(name="x", slug=other.slug, access_token=tokens.access_token)
    with pytest.raises(OrgMismatch):
        await owner.get_org(org_id=other.id)
    with pytest.raises(OrgMismatch):
        await owner.get_org(slug=other.slug)
    with pytest.raises(OrgMismatch):
        await owner.delete_org(org_id=uuid.uuid4())  # a user's token: no probing for ids

    await owner.delete_org(org_id=org.id)
    who = await client.authenticate(tokens.access_token)
    assert who.org_id == ""  # the deleted org is no session's active org any more


async def _awaited(result: Any) -> Any:
    """Awaits a coroutine; drains an async iterator (``iter_org_members``)."""
    if hasattr(result, "__aiter__"):
        return [item async for item in result]
    return await result


async def test_orgs_with_the_api_key(
    api: Api, client: AuthsvcClient, service: AuthsvcClient
) -> None:
    up = await _user(client)
    with pytest.raises(InvalidArgument):
        await service.create_org(name="x", slug=new_slug())  # an API key must name the owner
    with pytest.raises(UserNotFound):
        await service.create_org(name="x", slug=new_slug(), creator_id=uuid.uuid4())
    made = [
        await service.create_org(name=f"Org {i}", slug=new_slug(), creator_id=up.user.id)
        for i in range(5)
    ]
    ids = [o.id for o in made]
    listed = [o async for o in service.iter_orgs(user_id=up.user.id, page_size=2)]
    assert all(isinstance(o, OrgMembership) for o in listed)
    assert [o.org.id for o in listed] == ids
    assert [org.id for org, _ in await service.list_orgs(user_id=uuid.UUID(up.user.id))] == ids
    # Every org, listed with an admin credential: no memberships.
    every = await service.list_orgs(limit=2)
    assert [o.org.id for o in every] == ids[:2]
    assert [o.member for o in every] == [None, None]
    first = await service.list_orgs_by_cursor(user_id=up.user.id, limit=3)
    rest = await service.list_orgs_by_cursor(user_id=up.user.id, limit=3, after=first.next_cursor)
    assert ([o.org.id for o in first.items + rest.items], rest.next_cursor) == (ids, None)
    # The user lists their own.
    as_user = client.with_token(up.tokens.access_token)
    assert [o.org.id async for o in as_user.iter_orgs(page_size=4)] == ids
    assert [o.org.id for o in await as_user.list_orgs()] == ids

    assert (await service.get_org(slug=made[1].slug)).id == ids[1]
    assert (await service.update_org(org_id=ids[1], name="Renamed")).name == "Renamed"
    with pytest.raises(OrgNotFound):
        await service.get_org(org_id=uuid.uuid4())
    with pytest.raises(OrgNotFound):
        await service.update_org(slug=new_slug(), name="x")
    # The API key is no member: the owner is another member, so it takes force.
    with pytest.raises(OrgHasMembers):
        await service.delete_org(slug=made[0].slug)
    await service.delete_org(slug=made[0].slug, force=True)
    with pytest.raises(OrgNotFound):
        await service.delete_org(org_id=ids[0])
    with pytest.raises(OrgNotFound):
        await service.delete_org(slug=made[0].slug)
    assert [o.org.id for o in await service.list_orgs(user_id=up.user.id)] == ids[1:]


async def test_list_orgs_carries_each_membership(
    api: Api, client: AuthsvcClient, service: AuthsvcClient
) -> None:
    up = await _user(client)
    owned = await client.create_org(
        name="Mine", slug=new_slug(), access_token=up.tokens.access_token
    )
    other = await service.create_org(name="Theirs", slug=new_slug(), creator_id=up.user.id)
    guest = await _user(client)
    await service.add_org_member(org_id=owned.id, user_id=guest.user.id, role="admin")
    await service.add_org_member(slug=other.slug, user_id=guest.user.id)
    as_guest = client.with_token(guest.tokens.access_token)
    roles = [
        (org.id, member.role if member else None) for org, member in await as_guest.list_orgs()
    ]
    assert roles == [
        (owned.id, resources_pb2.ORG_ROLE_ADMIN),
        (other.id, resources_pb2.ORG_ROLE_MEMBER),
    ]
    mine = await service.list_orgs(user_id=up.user.id)
    assert [(o.org.id, o.member and o.member.user_id) for o in mine] == [
        (owned.id, up.user.id),
        (other.id, up.user.id),
    ]


async def test_org_etags_force_and_allow_missing(api: Api, client: AuthsvcClient) -> None:
    org, tokens = await _owner_of_new_org(client)
    owner = client.with_token(tokens.access_token)
    assert org.etag
    renamed = await owner.update_org(org_id=org.id, name="Acme Two", etag=org.etag)
    assert renamed.etag
    assert renamed.etag != org.etag
    with pytest.raises(EtagMismatch):
        await owner.update_org(slug=org.slug, name="Stale", etag=org.etag)
    with pytest.raises(EtagMismatch):
        await owner.delete_org(org_id=org.id, etag=org.etag)

    guest = await _user(client)
    added = await owner.add_org_member(org_id=org.id, user_id=guest.user.id)
    assert added.etag
    changed = await owner.update_org_member(
        org_id=org.id, user_id=guest.user.id, role="admin", etag=added.etag
    )
    assert changed.etag != added.etag
    with pytest.raises(EtagMismatch):
        await owner.update_org_member(
            org_id=org.id, user_id=guest.user.id, role="member", etag=added.etag
        )
    with pytest.raises(EtagMismatch):
        await owner.remove_org_member(org_id=org.id, user_id=guest.user.id, etag=added.etag)

    # Another member: deleting needs force.
    with pytest.raises(OrgHasMembers) as raised:
        await owner.delete_org(org_id=org.id)
    assert raised.value.code == grpc.StatusCode.FAILED_PRECONDITION
    await owner.remove_org_member(org_id=org.id, user_id=guest.user.id, etag=changed.etag)
    await owner.remove_org_member(org_id=org.id, user_id=guest.user.id, allow_missing=True)
    with pytest.raises(MemberNotFound):
        await owner.remove_org_member(org_id=org.id, user_id=guest.user.id)
    await owner.add_org_member(org_id=org.id, user_id=guest.user.id)
    await owner.delete_org(org_id=org.id, force=True)

    async with AuthsvcClient(api.target, api_key=API_KEY) as service:
        await service.delete_org(org_id=org.id, allow_missing=True)
        with pytest.raises(OrgNotFound):
            await service.delete_org(org_id=org.id)


async def test_members(api: Api, client: AuthsvcClient, service: AuthsvcClient) -> None:
    org, tokens = await _owner_of_new_org(client)
    owner = client.with_token(tokens.access_token)
    owner_id = (await owner.get_current_user()).id
    people = [await _user(client) for _ in range(4)]
    ids = [p.user.id for p in people]

    added = await owner.add_org_member(org_id=org.id, user_id=ids[0])
    assert (added.org_id, added.user_id, added.role) == (
        org.id,
        ids[0],
        resources_pb2.ORG_ROLE_MEMBER,
    )
    assert added.email == people[0].user.email
    await owner.add_org_member(org_id=uuid.UUID(org.id), user_id=ids[1], role="admin")
    await owner.add_org_member(slug=org.slug, user_id=ids[2], role=resources_pb2.ORG_ROLE_OWNER)
    await service.add_org_member(org_id=org.id, user_id=uuid.UUID(ids[3]))
    with pytest.raises(MemberAlreadyExists):
        await owner.add_org_member(org_id=org.id, user_id=ids[0])
    with pytest.raises(UserNotFound):
        await owner.add_org_member(org_id=org.id, user_id=uuid.uuid4())
    with pytest.raises(OrgNotFound):
        await service.add_org_member(org_id=uuid.uuid4(), user_id=ids[0])

    every = [owner_id, *ids]
    assert [m.user_id for m in await owner.list_org_members(org_id=org.id)] == every
    assert [m.user_id async for m in owner.iter_org_members(org_id=org.id, page_size=2)] == every
    assert [m.user_id async for m in service.iter_org_members(slug=org.slug, page_size=3)] == every
    assert [m.user_id for m in await owner.list_org_members(slug=org.slug, limit=2)] == every[:2]
    page = await owner.list_org_members_by_cursor(org_id=org.id, limit=3)
    rest = await owner.list_org_members_by_cursor(slug=org.slug, limit=3, after=page.next_cursor)
    assert ([m.user_id for m in page.items + rest.items], rest.next_cursor) == (every, None)

    got = await owner.get_org_member(org_id=org.id, user_id=ids[1])
    assert got.role == resources_pb2.ORG_ROLE_ADMIN
    assert (await owner.get_org_member(slug=org.slug, user_id=uuid.UUID(ids[2]))).role == (
        resources_pb2.ORG_ROLE_OWNER
    )
    with pytest.raises(MemberNotFound):
        await owner.get_org_member(org_id=org.id, user_id=uuid.uuid4())

    changed = await owner.update_org_member(org_id=org.id, user_id=ids[0], role="admin")
    assert changed.role == resources_pb2.ORG_ROLE_ADMIN
    by_slug = await owner.update_org_member(slug=org.slug, user_id=ids[0], role="member")
    assert by_slug.role == resources_pb2.ORG_ROLE_MEMBER
    with pytest.raises(MemberNotFound):
        await owner.update_org_member(org_id=org.id, user_id=uuid.uuid4(), role="member")
    with pytest.raises(InvalidArgument):
        await owner.update_org_member(
            org_id=org.id, user_id=ids[0], role=resources_pb2.ORG_ROLE_UNSPECIFIED
        )

    # A member (not admin) may read but not add.
    member_tokens = await client.set_active_org(
        refresh_token=people[3].tokens.refresh_token, slug=org.slug
    )
    _remember(member_tokens)
    member = client.with_token(member_tokens.access_token)
    assert (await member.get_org(org_id=org.id)).id == org.id
    assert (await member.get_org(slug=org.slug)).id == org.id
    with pytest.raises(PermissionDenied):
        await member.add_org_member(org_id=org.id, user_id=owner_id)

    await owner.remove_org_member(org_id=org.id, user_id=ids[0])
    with pytest.raises(MemberNotFound):
        await owner.remove_org_member(org_id=org.id, user_id=ids[0])
    with pytest.raises(OrgNotFound):
        await service.remove_org_member(org_id=uuid.uuid4(), user_id=ids[0])
    # Leaving: a member removes themselves.
    await member.remove_org_member(slug=org.slug, user_id=ids[3])
    # The last owner stays.
    await owner.remove_org_member(slug=org.slug, user_id=ids[2])
    with pytest.raises(LastOwner):
        await owner.remove_org_member(org_id=org.id, user_id=owner_id)
    with pytest.raises(LastOwner):
        await owner.update_org_member(org_id=org.id, user_id=owner_id, role="admin")
    assert [m.user_id for m in await service.list_org_members(org_id=org.id)] == [owner_id, ids[1]]


async def test_set_active_org_switches_and_clears(api: Api, client: AuthsvcClient) -> None:
    org_a, _ = await _owner_of_new_org(client)
    up = await _user(client)
    for named in ({"org_id": org_a.id}, {"slug": org_a.slug}):
        with pytest.raises(MemberNotFound):
            await client.set_active_org(refresh_token=up.tokens.refresh_token, **named)
    with pytest.raises(ValueError, match="exactly one"):
        await client.set_active_org(
            refresh_token=up.tokens.refresh_token, org_id=org_a.id, slug=org_a.slug
        )
    # Each exchange spends the refresh token: keep the latest.
    up = signed_in(await client.sign_in_with_password(up.user.email, PASSWORD))
    mine = await client.create_org(
        name="Mine", slug=new_slug(), access_token=up.tokens.access_token
    )
    switched = await client.set_active_org(
        refresh_token=up.tokens.refresh_token, org_id=uuid.UUID(mine.id)
    )
    _remember(switched)
    who = await client.authenticate(switched.access_token)
    assert (who.org_id, who.org_slug) == (mine.id, mine.slug)
    cleared = await client.set_active_org(refresh_token=switched.refresh_token, org_id=None)
    _remember(cleared)
    who = await client.authenticate(cleared.access_token)
    assert (who.org_id, who.org_slug, who.org_role) == ("", "", resources_pb2.ORG_ROLE_UNSPECIFIED)
    # By slug, as from a URL; then cleared by naming nothing.
    by_slug = await client.set_active_org(refresh_token=cleared.refresh_token, slug=mine.slug)
    _remember(by_slug)
    who = await client.authenticate(by_slug.access_token)
    assert (who.org_id, who.org_role) == (mine.id, resources_pb2.ORG_ROLE_OWNER)
    none = await client.set_active_org(refresh_token=by_slug.refresh_token)
    _remember(none)
    assert (await client.authenticate(none.access_token)).org_id == ""


async def test_set_active_org_with_a_spent_token_is_reuse(
    own_server: Callable[..., Awaitable[Api]],
) -> None:
    # The spent token, once the grace interval has passed (a server without one).
    api = await own_server(**NO_GRACE)
    async with AuthsvcClient(api.target) as client:
        up = await _user(client)
        mine = await client.create_org(
            name="Mine", slug=new_slug(), access_token=up.tokens.access_token
        )
        switched = await client.set_active_org(
            refresh_token=up.tokens.refresh_token, org_id=uuid.UUID(mine.id)
        )
        _remember(switched)
        with pytest.raises(RefreshTokenReused):
            await client.set_active_org(refresh_token=up.tokens.refresh_token, slug=mine.slug)


# -- channels -------------------------------------------------------------------


async def test_a_given_channel_is_the_callers(api: Api) -> None:
    channel = grpc.aio.insecure_channel(api.target)
    async with AuthsvcClient(channel, api_key=API_KEY) as made:
        assert await made.count_users() == 0
    # Closing the client left the channel open.
    assert await AuthsvcClient(channel, api_key=API_KEY).count_users() == 0
    await channel.close()
    with pytest.raises(ValueError, match="target"):
        AuthsvcClient(channel, options=[("grpc.enable_retries", 0)])


def _tls_pair(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "authsvc-test")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


async def test_tls_credentials(tmp_path: Path, log_file: Path) -> None:
    cert, key = _tls_pair(tmp_path)
    api = await start_api(
        Backend("embedded", {}), tmp_path / "data", tls_cert_file=cert, tls_key_file=key
    )
    try:
        trusted = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        async with AuthsvcClient(api.target, api_key=API_KEY, credentials=trusted) as secure:
            assert await secure.count_users() == 0
            assert (await secure.get_jwks())["keys"]
        async with AuthsvcClient(api.target, api_key=API_KEY, timeout=5) as plain:
            with pytest.raises(AuthsvcError) as raised:
                await plain.count_users()
            assert raised.value.code == grpc.StatusCode.UNAVAILABLE
    finally:
        await stop_api(api)
