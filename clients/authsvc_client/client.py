"""``AuthsvcClient``: the seed's ergonomic interface over the generated ``grpc.aio`` stubs.

::

    async with AuthsvcClient("127.0.0.1:50051", api_key=KEY) as auth:
        result = await auth.sign_up(email="a@example.com", password="...")
        org = await auth.create_org(name="Acme", slug="acme", creator_id=result.user.id)
        async for member in auth.iter_org_members(org_id=org.id):
            ...

Thin by design: each method builds one request, makes one call (the list
helpers one per page) and returns the response's payload, a generated
message (``resources_pb2.User``, ``resources_pb2.Org`` ...). The server decides
everything else. A failed call raises the typed exception of its reason
(``authsvc_client.errors``: ``InvalidCredentials``, ``OrgNotFound``,
``LastOwner`` ...), chained to the ``grpc.aio.AioRpcError``.

Credentials: each call sends exactly one, the first of: the call's
``access_token=`` argument, the client's ``access_token``, the client's
``api_key`` (an empty ``access_token=""`` means "no token": the API key, if
any, is sent). Calls whose credential is in the request (RefreshToken,
SetActiveOrg, Authenticate) and GetJwks send no token. (Sending a token and
a key together would make the server treat the call as the service's, not
the user's.) ``AuthsvcClient.with_token`` returns a client for one user on
the same channel.

Lists: ``list_x(limit=None)`` returns every item (or the first ``limit``),
following the cursor; ``iter_x()`` yields them page by page as they arrive;
``list_x_by_cursor(limit, after)`` returns one page and the cursor of the
next (``None`` on the last page). authsvc pages by cursor only (AIP-158), so
the seed's ``offset=`` arguments have no counterpart.

Where the seed differs from authsvc's API, the client follows the API:
``authenticate`` takes the token and raises the typed refusal rather than
returning ``None``; ``set_active_org`` names the session by its refresh token;
``sign_out_all`` returns how many sessions it revoked.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Generic, TypeVar, cast

import grpc
from google.protobuf.field_mask_pb2 import FieldMask

from authsvc_client.errors import (
    AuthsvcError,
    MemberNotFound,
    OrgNotFound,
    UserNotFound,
    from_rpc_error,
)
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

__all__ = ["AuthResult", "AuthsvcClient", "CursorResult"]

T = TypeVar("T")
Id = str | uuid.UUID
_ROLES = {"user": resources_pb2.ROLE_USER, "admin": resources_pb2.ROLE_ADMIN}
_ORG_ROLES = {
    "owner": resources_pb2.ORG_ROLE_OWNER,
    "admin": resources_pb2.ORG_ROLE_ADMIN,
    "member": resources_pb2.ORG_ROLE_MEMBER,
}


@dataclass(frozen=True)
class AuthResult:
    """A signed-up or signed-in user and the tokens of the new session."""

    user: resources_pb2.User
    tokens: resources_pb2.TokenPair


@dataclass(frozen=True)
class CursorResult(Generic[T]):
    """One page of a list and the cursor of the next (``None``: this was the last)."""

    items: list[T]
    next_cursor: str | None


def _id(value: Id | None) -> str:
    return "" if value is None else str(value)


def _role(value: str | int | None) -> resources_pb2.Role.ValueType:
    if value is None:
        return resources_pb2.ROLE_UNSPECIFIED
    if isinstance(value, str):
        return _ROLES[value.lower().removeprefix("role_")]
    return resources_pb2.Role.ValueType(value)


def _org_role(value: str | int | None) -> resources_pb2.OrgRole.ValueType:
    if value is None:
        return resources_pb2.ORG_ROLE_UNSPECIFIED
    if isinstance(value, str):
        return _ORG_ROLES[value.lower().removeprefix("org_role_")]
    return resources_pb2.OrgRole.ValueType(value)


def _client_info(user_agent: str | None, ip_address: str | None) -> resources_pb2.ClientInfo | None:
    if user_agent is None and ip_address is None:
        return None
    return resources_pb2.ClientInfo(user_agent=user_agent or "", ip_address=ip_address or "")


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
    async def _absent_is_false(call: Awaitable[Any], *absent: type[AuthsvcError]) -> bool:
        try:
            await call
        except absent:
            return False
        return True

    async def _pages(
        self, fetch: Callable[[str], Awaitable[Any]], field: str
    ) -> AsyncIterator[Any]:
        token = ""
        while True:
            page = await fetch(token)
            for item in getattr(page, field):
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

    @staticmethod
    def _cursor(page: Any, field: str) -> CursorResult[Any]:
        return CursorResult(list(getattr(page, field)), page.next_page_token or None)

    # ------------------------------------------------------------------ sign-up / sign-in

    async def sign_up(
        self,
        *,
        email: str,
        password: str,
        display_name: str | None = None,
        user_agent: str | None = None,
        ip_address: str | None = None,
        access_token: str | None = None,
    ) -> AuthResult:
        """Registers a user and signs them in.

        ``user_agent`` / ``ip_address`` are honoured on calls with the API key
        (a gateway signing up on a user's behalf).

        Raises:
            EmailAlreadyExists, WeakPassword, SignupDisabled, InvalidArgument, RateLimited.
        """
        request = auth_pb2.SignUpRequest(
            email=email,
            password=password,
            display_name=display_name or "",
            client_info=_client_info(user_agent, ip_address),
        )
        response = await self._call(self._auth.SignUp, request, access_token)
        return AuthResult(response.user, response.tokens)

    async def sign_in_with_password(
        self,
        email: str,
        password: str,
        *,
        user_agent: str | None = None,
        ip_address: str | None = None,
        access_token: str | None = None,
    ) -> AuthResult:
        """Signs in with email and password, starting a new session.

        Raises:
            InvalidCredentials, InvalidArgument, RateLimited.
        """
        request = auth_pb2.SignInWithPasswordRequest(
            email=email, password=password, client_info=_client_info(user_agent, ip_address)
        )
        response = await self._call(self._auth.SignInWithPassword, request, access_token)
        return AuthResult(response.user, response.tokens)

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
        org_id: Id | None,
        user_agent: str | None = None,
        ip_address: str | None = None,
    ) -> resources_pb2.TokenPair:
        """Switches the session of ``refresh_token`` to ``org_id`` (``None``: no org).

        The seed names the session by id; authsvc by its refresh token, which
        it rotates as RefreshToken does.

        Raises:
            MemberNotFound, TokenInvalid, RefreshTokenReused, SessionRevoked, SessionExpired.
        """
        request = auth_pb2.SetActiveOrgRequest(
            refresh_token=refresh_token,
            org_id=_id(org_id),
            client_info=_client_info(user_agent, ip_address),
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
        email: str | None = None,
        display_name: str | None = None,
        role: str | int | None = None,
        access_token: str | None = None,
    ) -> resources_pb2.User:
        """Changes the fields given (not ``None``).

        Raises:
            UserNotFound, PermissionDenied, EmailAlreadyExists, InvalidArgument.
        """
        user = resources_pb2.User(id=_id(user_id))
        paths: list[str] = []
        if email is not None:
            user.email, paths = email, [*paths, "email"]
        if display_name is not None:
            user.display_name, paths = display_name, [*paths, "display_name"]
        if role is not None:
            user.role, paths = _role(role), [*paths, "role"]
        request = users_pb2.UpdateUserRequest(user=user, update_mask=FieldMask(paths=paths))
        response = await self._call(self._users.UpdateUser, request, access_token)
        return cast(resources_pb2.User, response.user)

    async def delete_user(self, user_id: Id, *, access_token: str | None = None) -> bool:
        """Deletes a user and revokes their sessions; ``False`` if there was none."""
        request = users_pb2.DeleteUserRequest(user_id=_id(user_id))
        call = self._call(self._users.DeleteUser, request, access_token)
        return await self._absent_is_false(call, UserNotFound)

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

        Raises: OrgNotFound, OrgMismatch, PermissionDenied, InvalidArgument.
        """
        request = orgs_pb2.GetOrgRequest(org_id=_id(org_id), org_slug=slug or "")
        response = await self._call(self._orgs.GetOrg, request, access_token)
        return cast(resources_pb2.Org, response.org)

    async def update_org(
        self,
        *,
        org_id: Id | None = None,
        org_slug: str | None = None,
        name: str | None = None,
        slug: str | None = None,
        access_token: str | None = None,
    ) -> resources_pb2.Org:
        """Changes an org's ``name`` and/or ``slug`` (the fields given).

        The org is named by ``org_id`` or ``org_slug``; ``slug`` is the new slug.

        Raises: OrgNotFound, OrgSlugConflict, OrgMismatch, PermissionDenied, InvalidArgument.
        """
        org = resources_pb2.Org(name=name or "", slug=slug or "")
        paths = [p for p, v in (("name", name), ("slug", slug)) if v is not None]
        request = orgs_pb2.UpdateOrgRequest(
            org_id=_id(org_id),
            org_slug=org_slug or "",
            values=org,
            update_mask=FieldMask(paths=paths),
        )
        response = await self._call(self._orgs.UpdateOrg, request, access_token)
        return cast(resources_pb2.Org, response.org)

    async def delete_org(
        self,
        *,
        org_id: Id | None = None,
        slug: str | None = None,
        access_token: str | None = None,
    ) -> bool:
        """Deletes an org and its memberships; ``False`` if there was none.

        (A user's token names only its active org, so for it a missing org
        is an ``OrgMismatch``, raised.)
        """
        request = orgs_pb2.DeleteOrgRequest(org_id=_id(org_id), org_slug=slug or "")
        call = self._call(self._orgs.DeleteOrg, request, access_token)
        return await self._absent_is_false(call, OrgNotFound)

    async def list_orgs_by_cursor(
        self,
        *,
        user_id: Id | None = None,
        limit: int = 10,
        after: str | None = None,
        access_token: str | None = None,
    ) -> CursorResult[resources_pb2.Org]:
        """One page of orgs, oldest first: the user's (``None``: the calling
        user's, or with an admin credential every org)."""
        request = orgs_pb2.ListOrgsRequest(
            user_id=_id(user_id), page_size=limit, page_token=after or ""
        )
        page = await self._call(self._orgs.ListOrgs, request, access_token)
        return self._cursor(page, "orgs")

    def iter_orgs(
        self,
        *,
        user_id: Id | None = None,
        page_size: int = 0,
        access_token: str | None = None,
    ) -> AsyncIterator[resources_pb2.Org]:
        """Every org (see ``list_orgs_by_cursor``), a page at a time."""

        def fetch(token: str) -> Awaitable[Any]:
            request = orgs_pb2.ListOrgsRequest(
                user_id=_id(user_id), page_size=page_size, page_token=token
            )
            return self._call(self._orgs.ListOrgs, request, access_token)

        return self._pages(fetch, "orgs")

    async def list_orgs(
        self,
        *,
        user_id: Id | None = None,
        limit: int | None = None,
        access_token: str | None = None,
    ) -> list[resources_pb2.Org]:
        """Every org (the first ``limit``; see ``list_orgs_by_cursor``)."""
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
        """Adds a user to an org.

        Raises: OrgNotFound, UserNotFound, MemberAlreadyExists, OrgMismatch, PermissionDenied.
        """
        request = orgs_pb2.AddMemberRequest(
            org_id=_id(org_id), org_slug=slug or "", user_id=_id(user_id), role=_org_role(role)
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
        access_token: str | None = None,
    ) -> resources_pb2.Member:
        """Changes a member's role.

        Raises: OrgNotFound, MemberNotFound, LastOwner, OrgMismatch, PermissionDenied.
        """
        request = orgs_pb2.UpdateMemberRequest(
            org_id=_id(org_id), org_slug=slug or "", user_id=_id(user_id), role=_org_role(role)
        )
        response = await self._call(self._orgs.UpdateMember, request, access_token)
        return cast(resources_pb2.Member, response.member)

    async def remove_org_member(
        self,
        *,
        org_id: Id | None = None,
        slug: str | None = None,
        user_id: Id,
        access_token: str | None = None,
    ) -> bool:
        """Removes a user from an org; ``False`` if the org or the membership does not exist.

        Raises: LastOwner, OrgMismatch, PermissionDenied.
        """
        request = orgs_pb2.RemoveMemberRequest(
            org_id=_id(org_id), org_slug=slug or "", user_id=_id(user_id)
        )
        call = self._call(self._orgs.RemoveMember, request, access_token)
        return await self._absent_is_false(call, OrgNotFound, MemberNotFound)

    async def get_org_member(
        self,
        *,
        org_id: Id | None = None,
        slug: str | None = None,
        user_id: Id,
        access_token: str | None = None,
    ) -> resources_pb2.Member:
        """One membership. Raises: OrgNotFound, MemberNotFound, OrgMismatch, PermissionDenied."""
        request = orgs_pb2.GetMemberRequest(
            org_id=_id(org_id), org_slug=slug or "", user_id=_id(user_id)
        )
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
            org_id=_id(org_id), org_slug=slug or "", page_size=limit, page_token=after or ""
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
        """Every member of an org, oldest membership first, a page at a time."""

        def fetch(token: str) -> Awaitable[Any]:
            request = orgs_pb2.ListMembersRequest(
                org_id=_id(org_id), org_slug=slug or "", page_size=page_size, page_token=token
            )
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

        Raises: OrgNotFound, OrgMismatch, PermissionDenied.
        """
        items = self.iter_org_members(
            org_id=org_id,
            slug=slug,
            page_size=min(limit, 500) if limit else 0,
            access_token=access_token,
        )
        return await self._collect(items, limit)
