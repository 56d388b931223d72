"""gRPC servicers: convert the request, call one service method, convert back.

Credentials, statuses and logging live in ``authsvc.api.edge``.
"""

from __future__ import annotations

from typing import Any

import grpc

from authsvc.api import convert
from authsvc.api.edge import current_principal
from authsvc.services.auth import AuthService
from authsvc.services.keys import KeyStore
from authsvc.services.sessions import SessionService
from authsvc.services.users import UserService
from authsvc_client.v1 import (
    auth_pb2,
    auth_pb2_grpc,
    sessions_pb2,
    sessions_pb2_grpc,
    users_pb2,
    users_pb2_grpc,
)

Context = grpc.aio.ServicerContext[Any, Any]


class AuthServicer(auth_pb2_grpc.AuthServiceServicer):
    def __init__(self, auth: AuthService, keys: KeyStore) -> None:
        self._auth = auth
        self._keys = keys

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
            client=client,
        )
        return auth_pb2.SignUpResponse(
            user=convert.user(result.user), tokens=convert.tokens(result.tokens)
        )

    async def SignInWithPassword(
        self, request: auth_pb2.SignInWithPasswordRequest, context: Context
    ) -> auth_pb2.SignInWithPasswordResponse:
        client = convert.client_meta(
            context, request.client_info, request.HasField("client_info"), current_principal()
        )
        result = await self._auth.sign_in_with_password(
            email=request.email, password=request.password, client=client
        )
        return auth_pb2.SignInWithPasswordResponse(
            user=convert.user(result.user), tokens=convert.tokens(result.tokens)
        )

    async def RefreshToken(
        self, request: auth_pb2.RefreshTokenRequest, context: Context
    ) -> auth_pb2.RefreshTokenResponse:
        client = convert.client_meta(
            context, request.client_info, request.HasField("client_info"), current_principal()
        )
        issued = await self._auth.refresh(refresh_token=request.refresh_token, client=client)
        return auth_pb2.RefreshTokenResponse(tokens=convert.tokens(issued))

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
        return auth_pb2.AuthenticateResponse(session=convert.session_info(info))

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
        paths = list(request.update_mask.paths)
        user = await self._users.update(
            current_principal(),
            values.id,
            paths,
            display_name=values.display_name,
            email=values.email,
            role=convert.role_or_none(values.role),
        )
        return users_pb2.UpdateUserResponse(user=convert.user(user))

    async def DeleteUser(
        self, request: users_pb2.DeleteUserRequest, context: Context
    ) -> users_pb2.DeleteUserResponse:
        await self._users.delete(request.user_id)
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
