"""``AuthsvcClient``: the seed's ergonomic interface over the generated ``grpc.aio`` stubs.

::

    from authsvc_client.client import AuthsvcClient, SignedIn, SignInChallenge
    from authsvc_client.v1.resources_pb2 import SIGN_IN_REQUIREMENT_PASSWORD_CHANGE

    async def sign_in(auth: AuthsvcClient, email: str, password: str) -> SignedIn:
        outcome = await auth.sign_in_with_password(email, password)
        while True:
            match outcome:
                case SignedIn():
                    return outcome
                case SignInChallenge(pending_token=pending, requirements=needs):
                    if set(needs) != {SIGN_IN_REQUIREMENT_PASSWORD_CHANGE}:
                        raise CannotSignIn(needs)  # say what is needed; do not retry
                    outcome = await auth.complete_sign_in(pending, new_password=ask())

    async with AuthsvcClient("127.0.0.1:50051", api_key=KEY) as auth:
        signed = await sign_in(auth, "a@example.com", password)
        org = await auth.create_org(name="Acme", slug="acme", creator_id=signed.user.id)
        async for member in auth.iter_org_members(slug="acme"):
            ...

Thin by design: each method builds one request, makes one call (the list
helpers one per page) and returns the response's payload, a generated
message (``resources_pb2.User``, ``resources_pb2.Org`` ...). The server decides
everything else. A failed call raises the typed exception of its reason
(``authsvc_client.errors``: ``InvalidCredentials``, ``OrgNotFound``,
``LastOwner``, ``EtagMismatch`` ...), chained to the ``grpc.aio.AioRpcError``.

Signing in: ``sign_up``, ``sign_in_with_password`` and ``complete_sign_in``
return a ``SignInOutcome``, which is ``SignedIn | SignInChallenge``: the user
and the new session's tokens, or what the sign-in still needs before it yields
tokens (a short-lived ``pending_token`` for ``complete_sign_in``, the
``requirements``, an ``expire_time``). There is no ``.tokens`` on a challenge,
so a type checker refuses code that reads the tokens without handling the
challenge first, and such code fails loudly at run time rather than signing in
half-way. Today's server always answers tokens; a sign-in may answer a
challenge once accounts have second factors or confirmation rules, without any
change to the request. A requirement this client does not know (a newer
server's) is still in ``requirements``, as its number: say so to the user
rather than retry. An answer with neither outcome (a kind newer than this
client) raises ``AuthsvcError`` (code UNKNOWN, reason empty).

Organizations: every org method names the org by ``org_id=`` or by ``slug=``,
exactly one (``ValueError`` otherwise, before anything is sent), which fill the
request's ``org`` oneof. ``set_active_org`` takes either as well, or neither to
clear the active org. ``update_org`` takes the new slug as ``new_slug=``, since
``slug=`` names the org to change. ``list_orgs`` (and ``iter_orgs``,
``list_orgs_by_cursor``) yield ``OrgMembership(org, member)`` pairs: the user's
membership in each org (``member.role``), so a picker can show "Acme (admin)"
without switching orgs; ``member`` is ``None`` where the server lists every
org (an admin credential without ``user_id``).

Concurrency (AIP-154): ``User``, ``Org`` and ``Member`` carry an ``etag``. Pass
the etag you read to ``update_user``, ``set_user_role``, ``set_user_email``,
``delete_user``, ``update_org``, ``delete_org``, ``update_org_member`` or
``remove_org_member`` (``etag=``) to make the change only if nobody changed the
resource since; a stale one raises ``EtagMismatch`` (ABORTED). ``None`` (the
default) checks nothing. Deletes (AIP-135) return ``None``: a missing resource
raises its not-found error unless ``allow_missing=True``, which makes a retried
delete succeed; ``delete_org`` of an org with other members needs ``force=True``
(else ``OrgHasMembers``).

Credentials: each call sends exactly one, the first of: the call's
``access_token=`` argument, the client's ``access_token``, the client's
``api_key`` (an empty ``access_token=""`` means "no token": the API key, if
any, is sent). Calls whose credential is in the request (SignUp,
SignInWithPassword, CompleteSignIn, RefreshToken, SetActiveOrg, Authenticate)
and GetJwks send no token, only the API key if the client has one (it is what
lets a gateway pass ``user_agent``/``ip_address``). (Sending a token and a key
together would make the server treat the call as the service's, not the
user's.) ``AuthsvcClient.with_token`` returns a client for one user on the
same channel.

Lists: ``list_x(limit=None)`` returns every item (or the first ``limit``),
following the cursor; ``iter_x()`` yields them page by page as they arrive;
``list_x_by_cursor(limit, after)`` returns one page and the cursor of the
next (``None`` on the last page). authsvc pages by cursor only (AIP-158), so
the seed's ``offset=`` arguments have no counterpart.

Where the seed differs from authsvc's API, the client follows the API:
``authenticate`` takes the token and raises the typed refusal rather than
returning ``None``; ``set_active_org`` names the session by its refresh token;
``sign_out_all`` returns how many sessions it revoked; the platform role and
the email have their own methods (``set_user_role``, ``set_user_email``), not
``update_user`` fields.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Generic, NamedTuple, TypeAlias, TypeVar, cast

import grpc
from google.protobuf.field_mask_pb2 import FieldMask

from authsvc_client._tokens import ORG_ROLE_CLAIMS, ROLE_CLAIMS
from authsvc_client.errors import AuthsvcError, from_rpc_error
from authsvc_client.v1 import (
    auth_pb2,
    auth_pb2_grpc,
    orgs_pb2,
    orgs_pb2_grpc,
    resources_pb2,
    sessions_pb2,
    sessions_pb2_grpc,
    users_pb2,
    users_pb2_grpc,
)

__all__ = [
    "AuthsvcClient",
    "CursorResult",
    "OrgMembership",
    "SignInChallenge",
    "SignInOutcome",
    "SignedIn",
]

T = TypeVar("T")
Id = str | uuid.UUID
Requirement: TypeAlias = resources_pb2.SignInRequirement.ValueType


@dataclass(frozen=True)
class SignedIn:
    """A sign-in that yielded tokens: the user and the new session's token pair."""

    user: resources_pb2.User
    tokens: resources_pb2.TokenPair


@dataclass(frozen=True)
class SignInChallenge:
    """A sign-in that proved its first credential and needs more before it
    yields tokens; finish it with ``AuthsvcClient.complete_sign_in``.

    Attributes:
        pending_token: opaque and short-lived; send it to ``complete_sign_in``
            with the proof. Keep it like a password.
        requirements: what is still needed (``resources_pb2.SignInRequirement``
            values; a value this client does not know is kept as its number).
        expire_time: when ``pending_token`` stops working (UTC).
    """

    pending_token: str
    requirements: tuple[Requirement, ...]
    expire_time: dt.datetime


#: What every sign-in answers: handle both.
SignInOutcome: TypeAlias = SignedIn | SignInChallenge


class OrgMembership(NamedTuple):
    """One org of a list of orgs, and the listed user's membership in it
    (``None`` when the server listed every org, not one user's)."""

    org: resources_pb2.Org
    member: resources_pb2.Member | None


@dataclass(frozen=True)
class CursorResult(Generic[T]):
    """One page of a list and the cursor of the next (``None``: this was the last)."""

    items: list[T]
    next_cursor: str | None


def _id(value: Id | None) -> str:
    return "" if value is None else str(value)


def _org(org_id: Id | None, slug: str | None) -> dict[str, str]:
    """The ``org`` oneof of a request: exactly one of ``org_id`` and ``slug``.

    Raises:
        ValueError: both or neither.
    """
    if (org_id is None) == (slug is None):
        raise ValueError("name the org by org_id= or by slug=, exactly one")
    return {"org_id": str(org_id)} if org_id is not None else {"org_slug": cast(str, slug)}


def _role(value: str | int | None) -> resources_pb2.Role.ValueType:
    if value is None:
        return resources_pb2.ROLE_UNSPECIFIED
    if isinstance(value, str):
        return ROLE_CLAIMS[value.lower().removeprefix("role_")]
    return resources_pb2.Role.ValueType(value)


def _org_role(value: str | int | None) -> resources_pb2.OrgRole.ValueType:
    if value is None:
        return resources_pb2.ORG_ROLE_UNSPECIFIED
    if isinstance(value, str):
        return ORG_ROLE_CLAIMS[value.lower().removeprefix("org_role_")]
    return resources_pb2.OrgRole.ValueType(value)


def _client_info(user_agent: str | None, ip_address: str | None) -> resources_pb2.ClientInfo | None:
    if user_agent is None and ip_address is None:
        return None
    return resources_pb2.ClientInfo(user_agent=user_agent or "", ip_address=ip_address or "")


def _outcome(result: resources_pb2.SignInResult) -> SignInOutcome:
    """The SignInResult of a sign-in as a ``SignedIn`` or a ``SignInChallenge``.

    Raises:
        AuthsvcError: neither outcome is set (a kind newer than this client).
    """
    which = result.WhichOneof("outcome")
    if which == "tokens":
        return SignedIn(result.user, result.tokens)
    if which == "challenge":
        challenge = result.challenge
        return SignInChallenge(
            pending_token=challenge.pending_token,
            requirements=tuple(challenge.requirements),
            expire_time=challenge.expire_time.ToDatetime(tzinfo=dt.UTC),
        )
    raise AuthsvcError(
        grpc.StatusCode.UNKNOWN,
        "",
        "the sign-in answered neither tokens nor a challenge (a server newer than this client?)",
    )


def _memberships(page: orgs_pb2.ListOrgsResponse) -> list[OrgMembership]:
    # Paired by org id rather than by position: an org without a membership
    # in the answer gets None, never another org's role.
    by_org = {m.org_id: m for m in page.memberships}
    return [OrgMembership(org, by_org.get(org.id)) for org in page.orgs]


class AuthsvcClient:
    """An async authsvc client.

    Args:
        target: ``host:port`` (the client opens and owns a channel) or an open
            ``grpc.aio.Channel`` (the caller keeps owning it).
        api_key: a service API key, sent as ``x-api-key`` when no access
            token applies.
        access_token: the default user access token (override per call).
        credentials: TLS channel credentials (``grpc.ssl_channel_credentials``)
            for a target; without them the channel is plaintext.
        options: channel arguments for a target.
        interceptors: ``grpc.aio`` client interceptors for a target.
        timeout: the deadline of each call, in seconds (``None``: none).
    """

    def __init__(
        self,
        target: str | grpc.aio.Channel,
        *,
        api_key: str | None = None,
        access_token: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, Any]] | None = None,
        interceptors: Sequence[grpc.aio.ClientInterceptor] | None = None,
        timeout: float | None = 30.0,
    ) -> None:
        if isinstance(target, str):
            if credentials is not None:
                channel = grpc.aio.secure_channel(
                    target, credentials, options=options, interceptors=interceptors
                )
            else:
                channel = grpc.aio.insecure_channel(
                    target, options=options, interceptors=interceptors
                )
            self._owns_channel = True
        else:
            if credentials is not None or options or interceptors:
                raise ValueError("credentials, options and interceptors apply to a target only")
            channel = target
            self._owns_channel = False
        self.channel = channel
        self.api_key = api_key
        self.access_token = access_token
        self.timeout = timeout
        self._auth = auth_pb2_grpc.AuthServiceStub(channel)
        self._users = users_pb2_grpc.UserServiceStub(channel)
        self._sessions = sessions_pb2_grpc.SessionServiceStub(channel)
        self._orgs = orgs_pb2_grpc.OrgServiceStub(channel)

    def with_token(self, access_token: str | None) -> AuthsvcClient:
        """A client on the same channel whose default credential is ``access_token``."""
        other = AuthsvcClient(
            self.channel, api_key=self.api_key, access_token=access_token, timeout=self.timeout
        )
        return other

    async def close(self) -> None:
        """Closes the channel if this client opened it."""
        if self._owns_channel:
            await self.channel.close()

    async def __aenter__(self) -> AuthsvcClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # ------------------------------------------------------------------ plumbing

    def _metadata(self, access_token: str | None) -> tuple[tuple[str, str], ...]:
        token = access_token if access_token is not None else self.access_token
        if token:
            return (("authorization", f"Bearer {token}"),)
        if self.api_key:
            return (("x-api-key", self.api_key),)
        return ()

    async def _call(
        self, method: Callable[..., Awaitable[Any]], request: Any, access_token: str | None
    ) -> Any:
        try:
            return await method(
                request, metadata=self._metadata(access_token), timeout=self.timeout
            )
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error) from error

    @staticmethod
    def _items(page: Any, field: str | Callable[[Any], Iterable[Any]]) -> Iterable[Any]:
        return field(page) if callable(field) else getattr(page, field)

    async def _pages(
        self,
        fetch: Callable[[str], Awaitable[Any]],
        field: str | Callable[[Any], Iterable[Any]],
    ) -> AsyncIterator[Any]:
        token = ""
        while True:
            page = await fetch(token)
            for item in self._items(page, field):
                yield item
            token = page.next_page_token
            if not token:
                return

    @staticmethod
    async def _collect(items: AsyncIterator[T], limit: int | None) -> list[T]:
        out: list[T] = []
        try:
            if limit is not None and limit <= 0:
                return out
            async for item in items:
                out.append(item)
                if limit is not None and len(out) >= limit:
                    break
            return out
        finally:
            close = getattr(items, "aclose", None)
            if close is not None:
                await close()

    @classmethod
    def _cursor(cls, page: Any, field: str | Callable[[Any], Iterable[Any]]) -> CursorResult[Any]:
        return CursorResult(list(cls._items(page, field)), page.next_page_token or None)

    # ------------------------------------------------------------------ sign-up / sign-in

    async def sign_up(
        self,
        *,
        email: str,
        password: str,
        display_name: str | None = None,
        given_name: str | None = None,
        family_name: str | None = None,
        user_agent: str | None = None,
        ip_address: str | None = None,
    ) -> SignInOutcome:
        """Registers a user and signs them in: ``SignedIn``, or a ``SignInChallenge``.

        ``user_agent`` / ``ip_address`` are honoured on calls with the API key
        (a gateway signing up on a user's behalf).

        Raises:
            EmailAlreadyExists, WeakPassword, SignupDisabled, InvalidArgument, RateLimited.
        """
        request = auth_pb2.SignUpRequest(
            email=email,
            password=password,
            display_name=display_name or "",
            given_name=given_name or "",
            family_name=family_name or "",
            client_info=_client_info(user_agent, ip_address),
        )
        response = await self._call(self._auth.SignUp, request, "")
        return _outcome(response.result)

    async def sign_in_with_password(
        self,
        email: str,
        password: str,
        *,
        given_name: str | None = None,
        family_name: str | None = None,
        user_agent: str | None = None,
        ip_address: str | None = None,
    ) -> SignInOutcome:
        """Signs in with email and password, starting a new session: ``SignedIn``,
        or a ``SignInChallenge``.

        ``given_name`` / ``family_name`` fill in the user's names that are
        still empty; they never overwrite one.

        Raises:
            InvalidCredentials, InvalidArgument, RateLimited.
        """
        request = auth_pb2.SignInWithPasswordRequest(
            email=email,
            password=password,
            given_name=given_name or "",
            family_name=family_name or "",
            client_info=_client_info(user_agent, ip_address),
        )
        response = await self._call(self._auth.SignInWithPassword, request, "")
        return _outcome(response.result)

    async def complete_sign_in(
        self,
        pending_token: str,
        *,
        new_password: str | None = None,
        user_agent: str | None = None,
        ip_address: str | None = None,
    ) -> SignInOutcome:
        """Completes a ``SignInChallenge`` with the proof of one requirement:
        ``SignedIn`` once none is left, else a new ``SignInChallenge``.

        Args:
            pending_token: the challenge's; each works once.
            new_password: for SIGN_IN_REQUIREMENT_PASSWORD_CHANGE.

        Raises:
            PendingTokenInvalid, WeakPassword, InvalidArgument.
        """
        request = auth_pb2.CompleteSignInRequest(
            pending_token=pending_token, client_info=_client_info(user_agent, ip_address)
        )
        if new_password is not None:
            request.new_password = new_password
        response = await self._call(self._auth.CompleteSignIn, request, "")
        return _outcome(response.result)

    async def refresh_token(
        self,
        refresh_token: str,
        *,
        user_agent: str | None = None,
        ip_address: str | None = None,
    ) -> resources_pb2.TokenPair:
        """Exchanges a refresh token for a new pair (the presented one is spent).

        Raises:
            TokenInvalid, RefreshTokenReused, SessionRevoked, SessionExpired.
        """
        request = auth_pb2.RefreshTokenRequest(
            refresh_token=refresh_token, client_info=_client_info(user_agent, ip_address)
        )
        response = await self._call(self._auth.RefreshToken, request, "")
        return cast(resources_pb2.TokenPair, response.tokens)

    async def set_active_org(
        self,
        *,
        refresh_token: str,
        org_id: Id | None = None,
        slug: str | None = None,
        user_agent: str | None = None,
        ip_address: str | None = None,
    ) -> resources_pb2.TokenPair:
        """Switches the session of ``refresh_token`` to the org ``org_id`` or
        ``slug``; with neither, clears the session's active org.

        The seed names the session by id; authsvc by its refresh token, which
        it rotates as RefreshToken does. The new access token carries the org
        (``org_id``, ``org_slug``, ``org_role`` claims).

        Raises:
            ValueError: both ``org_id`` and ``slug``.
            MemberNotFound, TokenInvalid, RefreshTokenReused, SessionRevoked, SessionExpired.
        """
        org = _org(org_id, slug) if org_id is not None or slug is not None else {}
        request = auth_pb2.SetActiveOrgRequest(
            refresh_token=refresh_token,
            client_info=_client_info(user_agent, ip_address),
            **org,
        )
        response = await self._call(self._auth.SetActiveOrg, request, "")
        return cast(resources_pb2.TokenPair, response.tokens)

    async def authenticate(self, access_token: str) -> resources_pb2.SessionInfo:
        """Resolves an access token against the live session.

        Unlike the seed (which returns ``None``), a token that does not
        authenticate raises, so the reason (expired, revoked ...) is kept.

        Raises:
            TokenInvalid, TokenExpired, SessionRevoked, SessionExpired.
        """
        request = auth_pb2.AuthenticateRequest(access_token=access_token)
        response = await self._call(self._auth.Authenticate, request, "")
        return cast(resources_pb2.SessionInfo, response.session)

    async def sign_out(
        self, session_id: Id | None = None, *, access_token: str | None = None
    ) -> None:
        """Signs out.

        Without ``session_id``: revokes the session of the access token
        (SignOut). With it: revokes that session (RevokeSession; a user's own,
        or anyone's with an admin token or the API key).

        Raises:
            NotAuthenticated, SessionNotFound, PermissionDenied.
        """
        if session_id is None:
            await self._call(self._auth.SignOut, auth_pb2.SignOutRequest(), access_token)
        else:
            await self.revoke_session(session_id, access_token=access_token)

    async def get_jwks(self) -> dict[str, list[dict[str, str]]]:
        """The public keys that verify access tokens, as an RFC 7517 JWK set."""
        response = await self._call(self._auth.GetJwks, auth_pb2.GetJwksRequest(), "")
        fields = ("kty", "crv", "x", "kid", "use", "alg")
        return {"keys": [{f: getattr(k, f) for f in fields} for k in response.keys]}

    # ------------------------------------------------------------------ users

    async def get_user(self, user_id: Id, *, access_token: str | None = None) -> resources_pb2.User:
        """Raises: UserNotFound, PermissionDenied."""
        request = users_pb2.GetUserRequest(user_id=_id(user_id))
        response = await self._call(self._users.GetUser, request, access_token)
        return cast(resources_pb2.User, response.user)

    async def get_current_user(self, *, access_token: str | None = None) -> resources_pb2.User:
        """The user of the access token. Raises: NotAuthenticated and the token errors."""
        request = users_pb2.GetCurrentUserRequest()
        response = await self._call(self._users.GetCurrentUser, request, access_token)
        return cast(resources_pb2.User, response.user)

    async def list_users_by_cursor(
        self,
        *,
        limit: int = 10,
        after: str | None = None,
        role: str | int | None = None,
        email_prefix: str | None = None,
        access_token: str | None = None,
    ) -> CursorResult[resources_pb2.User]:
        """One page of users, oldest first. Raises: PermissionDenied, InvalidPageToken."""
        request = users_pb2.ListUsersRequest(
            page_size=limit,
            page_token=after or "",
            role=_role(role),
            email_prefix=email_prefix or "",
        )
        page = await self._call(self._users.ListUsers, request, access_token)
        return self._cursor(page, "users")

    def iter_users(
        self,
        *,
        page_size: int = 0,
        role: str | int | None = None,
        email_prefix: str | None = None,
        access_token: str | None = None,
    ) -> AsyncIterator[resources_pb2.User]:
        """Every user, oldest first, a page at a time (``page_size`` 0: the server's default)."""

        def fetch(token: str) -> Awaitable[Any]:
            request = users_pb2.ListUsersRequest(
                page_size=page_size,
                page_token=token,
                role=_role(role),
                email_prefix=email_prefix or "",
            )
            return self._call(self._users.ListUsers, request, access_token)

        return self._pages(fetch, "users")

    async def list_users(
        self,
        *,
        limit: int | None = None,
        role: str | int | None = None,
        email_prefix: str | None = None,
        access_token: str | None = None,
    ) -> list[resources_pb2.User]:
        """Every user (the first ``limit``), oldest first."""
        items = self.iter_users(
            page_size=min(limit, 500) if limit else 0,
            role=role,
            email_prefix=email_prefix,
            access_token=access_token,
        )
        return await self._collect(items, limit)

    async def update_user(
        self,
        *,
        user_id: Id,
        display_name: str | None = None,
        given_name: str | None = None,
        family_name: str | None = None,
        etag: str | None = None,
        access_token: str | None = None,
    ) -> resources_pb2.User:
        """Changes the profile fields given (not ``None``); with ``etag``, only
        if it is the user's current one.

        The role and the email have their own methods (``set_user_role``,
        ``set_user_email``).

        Raises:
            UserNotFound, PermissionDenied, EtagMismatch, InvalidArgument (nothing to change).
        """
        user = resources_pb2.User(id=_id(user_id), etag=etag or "")
        paths: list[str] = []
        for path, value in (
            ("display_name", display_name),
            ("given_name", given_name),
            ("family_name", family_name),
        ):
            if value is not None:
                setattr(user, path, value)
                paths.append(path)
        request = users_pb2.UpdateUserRequest(user=user, update_mask=FieldMask(paths=paths))
        response = await self._call(self._users.UpdateUser, request, access_token)
        return cast(resources_pb2.User, response.user)

    async def set_user_role(
        self,
        user_id: Id,
        role: str | int,
        *,
        etag: str | None = None,
        access_token: str | None = None,
    ) -> resources_pb2.User:
        """Sets a user's platform role (``"user"``, ``"admin"`` or a ``Role``); with
        ``etag``, only if it is the user's current one. Takes effect at the
        user's next Authenticate.

        Raises:
            UserNotFound, PermissionDenied, EtagMismatch, InvalidArgument.
        """
        request = users_pb2.SetUserRoleRequest(
            user_id=_id(user_id), role=_role(role), etag=etag or ""
        )
        response = await self._call(self._users.SetUserRole, request, access_token)
        return cast(resources_pb2.User, response.user)

    async def set_user_email(
        self,
        user_id: Id,
        email: str,
        *,
        etag: str | None = None,
        access_token: str | None = None,
    ) -> resources_pb2.User:
        """Sets a user's email directly, without a confirmation (an admin's or
        service's call); with ``etag``, only if it is the user's current one.

        Raises:
            UserNotFound, EmailAlreadyExists, PermissionDenied, EtagMismatch, InvalidArgument.
        """
        request = users_pb2.SetUserEmailRequest(user_id=_id(user_id), email=email, etag=etag or "")
        response = await self._call(self._users.SetUserEmail, request, access_token)
        return cast(resources_pb2.User, response.user)

    async def delete_user(
        self,
        user_id: Id,
        *,
        etag: str | None = None,
        allow_missing: bool = False,
        access_token: str | None = None,
    ) -> None:
        """Deletes a user and revokes their sessions; with ``etag``, only if it is
        the user's current one. With ``allow_missing``, a user that does not
        exist is not an error (a retried delete succeeds).

        Raises:
            UserNotFound (unless ``allow_missing``), PermissionDenied, EtagMismatch.
        """
        request = users_pb2.DeleteUserRequest(
            user_id=_id(user_id), etag=etag or "", allow_missing=allow_missing
        )
        await self._call(self._users.DeleteUser, request, access_token)

    async def count_users(
        self, *, role: str | int | None = None, access_token: str | None = None
    ) -> int:
        """How many users (of ``role``). Raises: PermissionDenied."""
        request = users_pb2.CountUsersRequest(role=_role(role))
        response = await self._call(self._users.CountUsers, request, access_token)
        return int(response.count)

    # ------------------------------------------------------------------ sessions

    async def list_sessions_by_cursor(
        self,
        *,
        user_id: Id | None = None,
        limit: int = 10,
        after: str | None = None,
        access_token: str | None = None,
    ) -> CursorResult[resources_pb2.Session]:
        """One page of live sessions, newest first (``user_id`` None: the caller's,
        or with an admin credential everyone's)."""
        request = sessions_pb2.ListSessionsRequest(
            user_id=_id(user_id), page_size=limit, page_token=after or ""
        )
        page = await self._call(self._sessions.ListSessions, request, access_token)
        return self._cursor(page, "sessions")

    def iter_sessions(
        self,
        *,
        user_id: Id | None = None,
        page_size: int = 0,
        access_token: str | None = None,
    ) -> AsyncIterator[resources_pb2.Session]:
        """Every live session, newest first, a page at a time."""

        def fetch(token: str) -> Awaitable[Any]:
            request = sessions_pb2.ListSessionsRequest(
                user_id=_id(user_id), page_size=page_size, page_token=token
            )
            return self._call(self._sessions.ListSessions, request, access_token)

        return self._pages(fetch, "sessions")

    async def list_sessions(
        self,
        *,
        user_id: Id | None = None,
        limit: int | None = None,
        access_token: str | None = None,
    ) -> list[resources_pb2.Session]:
        """Every live session (the first ``limit``), newest first."""
        items = self.iter_sessions(
            user_id=user_id, page_size=min(limit, 500) if limit else 0, access_token=access_token
        )
        return await self._collect(items, limit)

    async def revoke_session(self, session_id: Id, *, access_token: str | None = None) -> None:
        """Revokes one session. Raises: SessionNotFound, PermissionDenied."""
        request = sessions_pb2.RevokeSessionRequest(session_id=_id(session_id))
        await self._call(self._sessions.RevokeSession, request, access_token)

    async def sign_out_all(
        self, user_id: Id | None = None, *, access_token: str | None = None
    ) -> int:
        """Revokes every live session of a user (``None``: the caller); returns how many.

        Raises: UserNotFound, PermissionDenied.
        """
        request = sessions_pb2.RevokeAllSessionsRequest(user_id=_id(user_id))
        response = await self._call(self._sessions.RevokeAllSessions, request, access_token)
        return int(response.revoked_count)

    # ------------------------------------------------------------------ orgs

    async def create_org(
        self,
        *,
        name: str,
        slug: str,
        creator_id: Id | None = None,
        access_token: str | None = None,
    ) -> resources_pb2.Org:
        """Creates an org owned by ``creator_id`` (``None``: the calling user).

        Raises: OrgSlugConflict, UserNotFound, PermissionDenied, InvalidArgument.
        """
        request = orgs_pb2.CreateOrgRequest(name=name, slug=slug, owner_user_id=_id(creator_id))
        response = await self._call(self._orgs.CreateOrg, request, access_token)
        return cast(resources_pb2.Org, response.org)

    async def get_org(
        self,
        *,
        org_id: Id | None = None,
        slug: str | None = None,
        access_token: str | None = None,
    ) -> resources_pb2.Org:
        """An org by id or by slug (exactly one).

        Raises: ValueError (both or neither), OrgNotFound, OrgMismatch, PermissionDenied.
        """
        request = orgs_pb2.GetOrgRequest(**_org(org_id, slug))
        response = await self._call(self._orgs.GetOrg, request, access_token)
        return cast(resources_pb2.Org, response.org)

    async def update_org(
        self,
        *,
        org_id: Id | None = None,
        slug: str | None = None,
        name: str | None = None,
        new_slug: str | None = None,
        etag: str | None = None,
        access_token: str | None = None,
    ) -> resources_pb2.Org:
        """Changes an org's ``name`` and/or slug (``new_slug``): the fields given.

        The org is named by ``org_id`` or ``slug`` (exactly one). With ``etag``,
        the change is made only if it is the org's current one. A new slug is a
        claims change for the sessions acting in the org: their tokens carry
        the old ``org_slug`` until refreshed.

        Raises:
            ValueError (both or neither), OrgNotFound, OrgSlugConflict, OrgMismatch,
            PermissionDenied, EtagMismatch, InvalidArgument.
        """
        values = resources_pb2.Org(name=name or "", slug=new_slug or "", etag=etag or "")
        paths = [p for p, v in (("name", name), ("slug", new_slug)) if v is not None]
        request = orgs_pb2.UpdateOrgRequest(
            values=values, update_mask=FieldMask(paths=paths), **_org(org_id, slug)
        )
        response = await self._call(self._orgs.UpdateOrg, request, access_token)
        return cast(resources_pb2.Org, response.org)

    async def delete_org(
        self,
        *,
        org_id: Id | None = None,
        slug: str | None = None,
        etag: str | None = None,
        force: bool = False,
        allow_missing: bool = False,
        access_token: str | None = None,
    ) -> None:
        """Deletes an org and its memberships.

        An org with members other than the caller (for an admin token or the
        API key: any member) needs ``force``. With ``etag``, the org is deleted
        only if it is its current one; with ``allow_missing``, an org that does
        not exist is not an error. (A user's token names only its active org,
        so for it a missing org is an ``OrgMismatch``.)

        Raises:
            ValueError (both or neither), OrgNotFound (unless ``allow_missing``),
            OrgHasMembers, OrgMismatch, PermissionDenied, EtagMismatch.
        """
        request = orgs_pb2.DeleteOrgRequest(
            etag=etag or "", force=force, allow_missing=allow_missing, **_org(org_id, slug)
        )
        await self._call(self._orgs.DeleteOrg, request, access_token)

    async def list_orgs_by_cursor(
        self,
        *,
        user_id: Id | None = None,
        limit: int = 10,
        after: str | None = None,
        access_token: str | None = None,
    ) -> CursorResult[OrgMembership]:
        """One page of orgs, oldest first, each with the user's membership: the
        user's (``None``: the calling user's, or with an admin credential every
        org, with no memberships)."""
        request = orgs_pb2.ListOrgsRequest(
            user_id=_id(user_id), page_size=limit, page_token=after or ""
        )
        page = await self._call(self._orgs.ListOrgs, request, access_token)
        return self._cursor(page, _memberships)

    def iter_orgs(
        self,
        *,
        user_id: Id | None = None,
        page_size: int = 0,
        access_token: str | None = None,
    ) -> AsyncIterator[OrgMembership]:
        """Every org with the membership (see ``list_orgs_by_cursor``), a page at a time."""

        def fetch(token: str) -> Awaitable[Any]:
            request = orgs_pb2.ListOrgsRequest(
                user_id=_id(user_id), page_size=page_size, page_token=token
            )
            return self._call(self._orgs.ListOrgs, request, access_token)

        return self._pages(fetch, _memberships)

    async def list_orgs(
        self,
        *,
        user_id: Id | None = None,
        limit: int | None = None,
        access_token: str | None = None,
    ) -> list[OrgMembership]:
        """Every org with the membership (the first ``limit``; see ``list_orgs_by_cursor``).

        ``for org, member in await auth.list_orgs(access_token=token): ...``
        """
        items = self.iter_orgs(
            user_id=user_id, page_size=min(limit, 500) if limit else 0, access_token=access_token
        )
        return await self._collect(items, limit)

    # ------------------------------------------------------------------ members

    async def add_org_member(
        self,
        *,
        org_id: Id | None = None,
        slug: str | None = None,
        user_id: Id,
        role: str | int = "member",
        access_token: str | None = None,
    ) -> resources_pb2.Member:
        """Adds a user to an org (named by ``org_id`` or ``slug``).

        Raises: ValueError (both or neither), OrgNotFound, UserNotFound,
        MemberAlreadyExists, OrgMismatch, PermissionDenied.
        """
        request = orgs_pb2.AddMemberRequest(
            user_id=_id(user_id), role=_org_role(role), **_org(org_id, slug)
        )
        response = await self._call(self._orgs.AddMember, request, access_token)
        return cast(resources_pb2.Member, response.member)

    async def update_org_member(
        self,
        *,
        org_id: Id | None = None,
        slug: str | None = None,
        user_id: Id,
        role: str | int,
        etag: str | None = None,
        access_token: str | None = None,
    ) -> resources_pb2.Member:
        """Changes a member's role; with ``etag``, only if it is the membership's
        current one.

        Raises: ValueError (both or neither), OrgNotFound, MemberNotFound,
        LastOwner, OrgMismatch, PermissionDenied, EtagMismatch.
        """
        request = orgs_pb2.UpdateMemberRequest(
            user_id=_id(user_id), role=_org_role(role), etag=etag or "", **_org(org_id, slug)
        )
        response = await self._call(self._orgs.UpdateMember, request, access_token)
        return cast(resources_pb2.Member, response.member)

    async def remove_org_member(
        self,
        *,
        org_id: Id | None = None,
        slug: str | None = None,
        user_id: Id,
        etag: str | None = None,
        allow_missing: bool = False,
        access_token: str | None = None,
    ) -> None:
        """Removes a user from an org (a member may remove themselves).

        With ``etag``, only if it is the membership's current one; with
        ``allow_missing``, a membership that does not exist is not an error.

        Raises: ValueError (both or neither), OrgNotFound, MemberNotFound
        (unless ``allow_missing``), LastOwner, OrgMismatch, PermissionDenied,
        EtagMismatch.
        """
        request = orgs_pb2.RemoveMemberRequest(
            user_id=_id(user_id),
            etag=etag or "",
            allow_missing=allow_missing,
            **_org(org_id, slug),
        )
        await self._call(self._orgs.RemoveMember, request, access_token)

    async def get_org_member(
        self,
        *,
        org_id: Id | None = None,
        slug: str | None = None,
        user_id: Id,
        access_token: str | None = None,
    ) -> resources_pb2.Member:
        """One membership. Raises: ValueError (both or neither), OrgNotFound,
        MemberNotFound, OrgMismatch, PermissionDenied."""
        request = orgs_pb2.GetMemberRequest(user_id=_id(user_id), **_org(org_id, slug))
        response = await self._call(self._orgs.GetMember, request, access_token)
        return cast(resources_pb2.Member, response.member)

    async def list_org_members_by_cursor(
        self,
        *,
        org_id: Id | None = None,
        slug: str | None = None,
        limit: int = 10,
        after: str | None = None,
        access_token: str | None = None,
    ) -> CursorResult[resources_pb2.Member]:
        """One page of an org's members, oldest membership first."""
        request = orgs_pb2.ListMembersRequest(
            page_size=limit, page_token=after or "", **_org(org_id, slug)
        )
        page = await self._call(self._orgs.ListMembers, request, access_token)
        return self._cursor(page, "members")

    def iter_org_members(
        self,
        *,
        org_id: Id | None = None,
        slug: str | None = None,
        page_size: int = 0,
        access_token: str | None = None,
    ) -> AsyncIterator[resources_pb2.Member]:
        """Every member of an org, oldest membership first, a page at a time.

        Raises: ValueError (both or neither org keys), at once.
        """
        org = _org(org_id, slug)

        def fetch(token: str) -> Awaitable[Any]:
            request = orgs_pb2.ListMembersRequest(page_size=page_size, page_token=token, **org)
            return self._call(self._orgs.ListMembers, request, access_token)

        return self._pages(fetch, "members")

    async def list_org_members(
        self,
        *,
        org_id: Id | None = None,
        slug: str | None = None,
        limit: int | None = None,
        access_token: str | None = None,
    ) -> list[resources_pb2.Member]:
        """Every member of an org (the first ``limit``), oldest membership first.

        Raises: ValueError (both or neither), OrgNotFound, OrgMismatch, PermissionDenied.
        """
        items = self.iter_org_members(
            org_id=org_id,
            slug=slug,
            page_size=min(limit, 500) if limit else 0,
            access_token=access_token,
        )
        return await self._collect(items, limit)
