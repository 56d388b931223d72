"""gRPC servicers: convert the request, call one service method, convert back.

Credentials, statuses and logging live in ``authsvc.api.edge``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from authsvc.api import convert
from authsvc.api.edge import current_principal
from authsvc.domain.models import OrgRole
from authsvc.domain.principal import SessionInfo
from authsvc.services.auth import AuthService
from authsvc.services.keys import KeyStore
from authsvc.services.orgs import OrgService
from authsvc.services.revocations import RevocationFeed
from authsvc.services.sessions import SessionService
from authsvc.services.users import UserService
from authsvc_client.v1 import (
    auth_pb2,
    auth_pb2_grpc,
    orgs_pb2,
    orgs_pb2_grpc,
    sessions_pb2,
    sessions_pb2_grpc,
    users_pb2,
    users_pb2_grpc,
)

Context = grpc.aio.ServicerContext[Any, Any]

#: Most AuthenticateResponse messages kept by ``_Responses``.
RESPONSES_KEPT = 8192


class _Responses:
    """Authenticate's response message for each SessionInfo, built once.

    A token ``AuthService.authenticate`` answers from its cache comes back as
    the very SessionInfo object the cache holds, so the message is built on
    the first hit and reused on the next ones; a fresh resolution is a new
    object and gets a new message. This only renders what ``authenticate``
    has already accepted: a revoked or expired session raises there, before
    any message is looked up.

    Keyed by identity (an immutable SessionInfo; the id of one held here
    cannot be reused by another while it is held). The oldest go beyond
    ``kept``. The messages are never mutated once built: grpc only
    serializes them.
    """

    def __init__(self, kept: int = RESPONSES_KEPT) -> None:
        self._kept = kept
        self._by_id: dict[int, tuple[SessionInfo, auth_pb2.AuthenticateResponse]] = {}

    def get(self, info: SessionInfo) -> auth_pb2.AuthenticateResponse:
        found = self._by_id.get(id(info))
        if found is not None and found[0] is info:
            return found[1]
        response = auth_pb2.AuthenticateResponse(session=convert.session_info(info))
        if len(self._by_id) >= self._kept:
            del self._by_id[next(iter(self._by_id))]
        self._by_id[id(info)] = (info, response)
        return response


class AuthServicer(auth_pb2_grpc.AuthServiceServicer):
    def __init__(self, auth: AuthService, keys: KeyStore, feed: RevocationFeed) -> None:
        self._auth = auth
        self._keys = keys
        self._feed = feed
        self._responses = _Responses()

    async def SignUp(
        self, request: auth_pb2.SignUpRequest, context: Context
    ) -> auth_pb2.SignUpResponse:
        client = convert.client_meta(
            context, request.client_info, request.HasField("client_info"), current_principal()
        )
        result = await self._auth.sign_up(
            email=request.email,
            password=request.password,
            display_name=request.display_name,
            given_name=request.given_name,
            family_name=request.family_name,
            client=client,
        )
        return auth_pb2.SignUpResponse(result=convert.signed_in(result.user, result.tokens))

    async def SignInWithPassword(
        self, request: auth_pb2.SignInWithPasswordRequest, context: Context
    ) -> auth_pb2.SignInWithPasswordResponse:
        client = convert.client_meta(
            context, request.client_info, request.HasField("client_info"), current_principal()
        )
        result = await self._auth.sign_in_with_password(
            email=request.email,
            password=request.password,
            given_name=request.given_name,
            family_name=request.family_name,
            client=client,
        )
        return auth_pb2.SignInWithPasswordResponse(
            result=convert.signed_in(result.user, result.tokens)
        )

    async def CompleteSignIn(
        self, request: auth_pb2.CompleteSignInRequest, context: Context
    ) -> auth_pb2.CompleteSignInResponse:
        client = convert.client_meta(
            context, request.client_info, request.HasField("client_info"), current_principal()
        )
        result = await self._auth.complete_sign_in(
            pending_token=request.pending_token, client=client
        )
        return auth_pb2.CompleteSignInResponse(result=convert.signed_in(result.user, result.tokens))

    async def RefreshToken(
        self, request: auth_pb2.RefreshTokenRequest, context: Context
    ) -> auth_pb2.RefreshTokenResponse:
        client = convert.client_meta(
            context, request.client_info, request.HasField("client_info"), current_principal()
        )
        issued = await self._auth.refresh(refresh_token=request.refresh_token, client=client)
        return auth_pb2.RefreshTokenResponse(tokens=convert.tokens(issued))

    async def SetActiveOrg(
        self, request: auth_pb2.SetActiveOrgRequest, context: Context
    ) -> auth_pb2.SetActiveOrgResponse:
        client = convert.client_meta(
            context, request.client_info, request.HasField("client_info"), current_principal()
        )
        org_id, org_slug = convert.org_key(request)
        issued = await self._auth.set_active_org(
            refresh_token=request.refresh_token, org_id=org_id, org_slug=org_slug, client=client
        )
        return auth_pb2.SetActiveOrgResponse(tokens=convert.tokens(issued))

    async def WatchRevocations(
        self, request: auth_pb2.WatchRevocationsRequest, context: Context
    ) -> AsyncIterator[auth_pb2.WatchRevocationsResponse]:
        retention = int(self._feed.retention)
        async for batch in self._feed.watch(request.after):
            yield auth_pb2.WatchRevocationsResponse(
                revocations=[convert.revocation(e) for e in batch.events],
                position=batch.position,
                gap=batch.gap,
                retention_seconds=retention,
            )

    async def SignOut(
        self, request: auth_pb2.SignOutRequest, context: Context
    ) -> auth_pb2.SignOutResponse:
        session = current_principal().session
        assert session is not None  # ACCESS_USER guarantees it
        await self._auth.sign_out(session)
        return auth_pb2.SignOutResponse()

    async def Authenticate(
        self, request: auth_pb2.AuthenticateRequest, context: Context
    ) -> auth_pb2.AuthenticateResponse:
        info = await self._auth.authenticate(request.access_token)
        return self._responses.get(info)

    async def GetJwks(
        self, request: auth_pb2.GetJwksRequest, context: Context
    ) -> auth_pb2.GetJwksResponse:
        return auth_pb2.GetJwksResponse(keys=[auth_pb2.Jwk(**jwk) for jwk in self._keys.jwks()])


class UserServicer(users_pb2_grpc.UserServiceServicer):
    def __init__(self, users: UserService) -> None:
        self._users = users

    async def GetUser(
        self, request: users_pb2.GetUserRequest, context: Context
    ) -> users_pb2.GetUserResponse:
        user = await self._users.get(current_principal(), request.user_id)
        return users_pb2.GetUserResponse(user=convert.user(user))

    async def GetCurrentUser(
        self, request: users_pb2.GetCurrentUserRequest, context: Context
    ) -> users_pb2.GetCurrentUserResponse:
        user = await self._users.get_current(current_principal())
        return users_pb2.GetCurrentUserResponse(user=convert.user(user))

    async def ListUsers(
        self, request: users_pb2.ListUsersRequest, context: Context
    ) -> users_pb2.ListUsersResponse:
        users, token = await self._users.list(
            page_size=request.page_size,
            page_token=request.page_token,
            role=convert.role_filter(request.role),
            email_prefix=request.email_prefix,
        )
        return users_pb2.ListUsersResponse(
            users=[convert.user(u) for u in users], next_page_token=token
        )

    async def UpdateUser(
        self, request: users_pb2.UpdateUserRequest, context: Context
    ) -> users_pb2.UpdateUserResponse:
        values = request.user
        user = await self._users.update(
            current_principal(),
            values.id,
            list(request.update_mask.paths),
            display_name=values.display_name,
            given_name=values.given_name,
            family_name=values.family_name,
            etag=values.etag,
        )
        return users_pb2.UpdateUserResponse(user=convert.user(user))

    async def SetUserRole(
        self, request: users_pb2.SetUserRoleRequest, context: Context
    ) -> users_pb2.SetUserRoleResponse:
        user = await self._users.set_role(
            request.user_id, convert.role_or_none(request.role), etag=request.etag
        )
        return users_pb2.SetUserRoleResponse(user=convert.user(user))

    async def SetUserEmail(
        self, request: users_pb2.SetUserEmailRequest, context: Context
    ) -> users_pb2.SetUserEmailResponse:
        user = await self._users.set_email(request.user_id, request.email, etag=request.etag)
        return users_pb2.SetUserEmailResponse(user=convert.user(user))

    async def DeleteUser(
        self, request: users_pb2.DeleteUserRequest, context: Context
    ) -> users_pb2.DeleteUserResponse:
        await self._users.delete(
            request.user_id, etag=request.etag, allow_missing=request.allow_missing
        )
        return users_pb2.DeleteUserResponse()

    async def CountUsers(
        self, request: users_pb2.CountUsersRequest, context: Context
    ) -> users_pb2.CountUsersResponse:
        count = await self._users.count(convert.role_filter(request.role))
        return users_pb2.CountUsersResponse(count=count)


class SessionServicer(sessions_pb2_grpc.SessionServiceServicer):
    def __init__(self, sessions: SessionService) -> None:
        self._sessions = sessions

    async def ListSessions(
        self, request: sessions_pb2.ListSessionsRequest, context: Context
    ) -> sessions_pb2.ListSessionsResponse:
        principal = current_principal()
        sessions, token = await self._sessions.list(
            principal,
            user_id=request.user_id,
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return sessions_pb2.ListSessionsResponse(
            sessions=[convert.session(s, principal) for s in sessions], next_page_token=token
        )

    async def RevokeSession(
        self, request: sessions_pb2.RevokeSessionRequest, context: Context
    ) -> sessions_pb2.RevokeSessionResponse:
        await self._sessions.revoke(current_principal(), request.session_id)
        return sessions_pb2.RevokeSessionResponse()

    async def RevokeAllSessions(
        self, request: sessions_pb2.RevokeAllSessionsRequest, context: Context
    ) -> sessions_pb2.RevokeAllSessionsResponse:
        count = await self._sessions.revoke_all(current_principal(), request.user_id)
        return sessions_pb2.RevokeAllSessionsResponse(revoked_count=count)


class OrgServicer(orgs_pb2_grpc.OrgServiceServicer):
    def __init__(self, orgs: OrgService) -> None:
        self._orgs = orgs

    async def CreateOrg(
        self, request: orgs_pb2.CreateOrgRequest, context: Context
    ) -> orgs_pb2.CreateOrgResponse:
        org = await self._orgs.create(
            current_principal(),
            slug=request.slug,
            name=request.name,
            owner_user_id=request.owner_user_id,
        )
        return orgs_pb2.CreateOrgResponse(org=convert.org(org))

    async def GetOrg(
        self, request: orgs_pb2.GetOrgRequest, context: Context
    ) -> orgs_pb2.GetOrgResponse:
        org_id, org_slug = convert.org_key(request)
        org = await self._orgs.get(current_principal(), org_id=org_id, org_slug=org_slug)
        return orgs_pb2.GetOrgResponse(org=convert.org(org))

    async def UpdateOrg(
        self, request: orgs_pb2.UpdateOrgRequest, context: Context
    ) -> orgs_pb2.UpdateOrgResponse:
        org_id, org_slug = convert.org_key(request)
        org = await self._orgs.update(
            current_principal(),
            org_id=org_id,
            org_slug=org_slug,
            paths=list(request.update_mask.paths),
            name=request.values.name,
            slug=request.values.slug,
            etag=request.values.etag,
        )
        return orgs_pb2.UpdateOrgResponse(org=convert.org(org))

    async def DeleteOrg(
        self, request: orgs_pb2.DeleteOrgRequest, context: Context
    ) -> orgs_pb2.DeleteOrgResponse:
        org_id, org_slug = convert.org_key(request)
        await self._orgs.delete(
            current_principal(),
            org_id=org_id,
            org_slug=org_slug,
            etag=request.etag,
            force=request.force,
            allow_missing=request.allow_missing,
        )
        return orgs_pb2.DeleteOrgResponse()

    async def ListOrgs(
        self, request: orgs_pb2.ListOrgsRequest, context: Context
    ) -> orgs_pb2.ListOrgsResponse:
        orgs, memberships, token = await self._orgs.list_orgs(
            current_principal(),
            user_id=request.user_id,
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return orgs_pb2.ListOrgsResponse(
            orgs=[convert.org(o) for o in orgs],
            memberships=[convert.member(m) for m in memberships],
            next_page_token=token,
        )

    async def AddMember(
        self, request: orgs_pb2.AddMemberRequest, context: Context
    ) -> orgs_pb2.AddMemberResponse:
        org_id, org_slug = convert.org_key(request)
        member = await self._orgs.add_member(
            current_principal(),
            org_id=org_id,
            org_slug=org_slug,
            user_id=request.user_id,
            role=convert.org_role_from_proto(request.role, default=OrgRole.MEMBER),
        )
        return orgs_pb2.AddMemberResponse(member=convert.member(member))

    async def UpdateMember(
        self, request: orgs_pb2.UpdateMemberRequest, context: Context
    ) -> orgs_pb2.UpdateMemberResponse:
        org_id, org_slug = convert.org_key(request)
        member = await self._orgs.update_member(
            current_principal(),
            org_id=org_id,
            org_slug=org_slug,
            user_id=request.user_id,
            role=convert.org_role_from_proto(request.role),
            etag=request.etag,
        )
        return orgs_pb2.UpdateMemberResponse(member=convert.member(member))

    async def RemoveMember(
        self, request: orgs_pb2.RemoveMemberRequest, context: Context
    ) -> orgs_pb2.RemoveMemberResponse:
        org_id, org_slug = convert.org_key(request)
        await self._orgs.remove_member(
            current_principal(),
            org_id=org_id,
            org_slug=org_slug,
            user_id=request.user_id,
            etag=request.etag,
            allow_missing=request.allow_missing,
        )
        return orgs_pb2.RemoveMemberResponse()

    async def GetMember(
        self, request: orgs_pb2.GetMemberRequest, context: Context
    ) -> orgs_pb2.GetMemberResponse:
        org_id, org_slug = convert.org_key(request)
        member = await self._orgs.get_member(
            current_principal(),
            org_id=org_id,
            org_slug=org_slug,
            user_id=request.user_id,
        )
        return orgs_pb2.GetMemberResponse(member=convert.member(member))

    async def ListMembers(
        self, request: orgs_pb2.ListMembersRequest, context: Context
    ) -> orgs_pb2.ListMembersResponse:
        org_id, org_slug = convert.org_key(request)
        members, token = await self._orgs.list_members(
            current_principal(),
            org_id=org_id,
            org_slug=org_slug,
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return orgs_pb2.ListMembersResponse(
            members=[convert.member(m) for m in members], next_page_token=token
        )
