"""The active org of a session: SetActiveOrg, its claims, and how changes reach it.

What this proves, as auth.proto and orgs.proto state it: SetActiveOrg rotates
the refresh token exactly as RefreshToken does (same reuse detection, same
grace interval) and returns a pair whose access token carries ``org_id``,
``org_role`` and ``ver``; it names the org by id or by slug; it needs a
membership (a missing org, an unknown slug and a missing membership fail
alike, MEMBER_NOT_FOUND, with the same statements, and spend nothing); a
malformed id or slug is INVALID_ARGUMENT naming its field; leaving the org
unset, or sending an empty id or slug, clears the active org; the active org
belongs to the session and survives every refresh (seed 000 lost it at the
first one). When a membership is removed or its role changes, Authenticate
shows it at once and the next refresh carries it, with a higher ``ver``; so
does a platform role change.

Access-token claims are read without verifying the signature: what is checked
here is what the server put in them (signatures are tests/test_bad_input.py's).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask
from google.rpc import error_details_pb2
from sqlalchemy import event

from authsvc_client.v1 import auth_pb2, orgs_pb2, resources_pb2, sessions_pb2, users_pb2
from tests.app import (
    NO_GRACE,
    PASSWORD,
    Api,
    OrgRole,
    OrgUser,
    bearer,
    claims,
    failure,
    new_slug,
    org_member,
    org_with_owner,
    refreshed,
    refused,
    remember,
    service,
    set_active_org,
    who,
)

OWNER = resources_pb2.ORG_ROLE_OWNER
ADMIN = resources_pb2.ORG_ROLE_ADMIN
MEMBER = resources_pb2.ORG_ROLE_MEMBER
NO_ROLE = resources_pb2.ORG_ROLE_UNSPECIFIED
ROLE_CLAIM = {OWNER: "owner", ADMIN: "admin", MEMBER: "member"}

MEMBER_NOT_FOUND = (grpc.StatusCode.NOT_FOUND, "MEMBER_NOT_FOUND")
REUSED = (grpc.StatusCode.UNAUTHENTICATED, "REFRESH_TOKEN_REUSED")
REVOKED = (grpc.StatusCode.UNAUTHENTICATED, "SESSION_REVOKED")


def _assert_in_org(token: str, org_id: str, role: OrgRole) -> dict[str, Any]:
    payload = claims(token)
    assert (payload.get("org_id"), payload.get("org_role")) == (org_id, ROLE_CLAIM[role])
    return payload


def _assert_no_org(token: str) -> dict[str, Any]:
    payload = claims(token)
    assert "org_id" not in payload, payload
    assert "org_role" not in payload, payload
    return payload


def _ver(token: str) -> int:
    ver = claims(token)["ver"]
    assert isinstance(ver, int)
    assert not isinstance(ver, bool)
    return ver


async def _session_org(api: Api, token: str) -> tuple[str, OrgRole]:
    session = await who(api, token)
    return session.org_id, session.org_role


async def _create_org(api: Api, token: str) -> Any:
    response = await api.orgs.CreateOrg(
        orgs_pb2.CreateOrgRequest(slug=f"org-{uuid.uuid4().hex[:12]}", name="Acme"),
        metadata=bearer(token),
    )
    return response.org


async def _sign_in(api: Api, email: str) -> Any:
    signed = await api.auth.SignInWithPassword(
        auth_pb2.SignInWithPasswordRequest(email=email, password=PASSWORD)
    )
    remember(signed.result.tokens.access_token, signed.result.tokens.refresh_token)
    return signed.result.tokens


# -- SetActiveOrg ------------------------------------------------------------------


async def test_set_active_org_returns_a_pair_carrying_the_org(api: Api) -> None:
    created = await api.sign_up()
    org = await _create_org(api, created.tokens.access_token)
    before = claims(created.tokens.access_token)
    assert "org_id" not in before
    assert isinstance(before["ver"], int)

    pair = await set_active_org(api, created.tokens.refresh_token, org.id)

    assert pair.session_id == created.tokens.session_id
    assert pair.refresh_token != created.tokens.refresh_token
    assert pair.token_type == "Bearer"
    assert pair.expires_in > 0
    payload = _assert_in_org(pair.access_token, org.id, OWNER)
    assert (payload["sub"], payload["sid"], payload["role"]) == (
        created.user.id,
        created.tokens.session_id,
        "user",
    )
    assert _ver(pair.access_token) >= before["ver"]
    assert await _session_org(api, pair.access_token) == (org.id, OWNER)
    listed = await api.sessions.ListSessions(
        sessions_pb2.ListSessionsRequest(), metadata=bearer(pair.access_token)
    )
    assert [s.org_id for s in listed.sessions] == [org.id]


@pytest.mark.parametrize("role", [ADMIN, MEMBER])
async def test_the_claims_carry_the_members_role(api: Api, role: OrgRole) -> None:
    org, _ = await org_with_owner(api)
    member = await org_member(api, org.id, role)
    _assert_in_org(member.token, org.id, role)
    assert await _session_org(api, member.token) == (org.id, role)


async def test_set_active_org_needs_a_membership(api: Api) -> None:
    org, _ = await org_with_owner(api)
    outsider = await api.sign_up()
    refresh_token = outsider.tokens.refresh_token
    for org_id in (org.id, str(uuid.uuid4())):
        await refused(
            api,
            partial(
                api.auth.SetActiveOrg,
                auth_pb2.SetActiveOrgRequest(refresh_token=refresh_token, org_id=org_id),
            ),
            *MEMBER_NOT_FOUND,
        )
    # Nothing was spent: the refresh token still works, and carries no org.
    pair = await refreshed(api, refresh_token)
    _assert_no_org(pair.access_token)


async def test_an_empty_org_id_clears_the_active_org(api: Api) -> None:
    org, owner = await org_with_owner(api)
    cleared = await set_active_org(api, owner.tokens.refresh_token, "")
    assert cleared.session_id == owner.tokens.session_id
    _assert_no_org(cleared.access_token)
    assert await _session_org(api, cleared.access_token) == ("", NO_ROLE)
    _assert_no_org((await refreshed(api, cleared.refresh_token)).access_token)
    listed = await api.sessions.ListSessions(
        sessions_pb2.ListSessionsRequest(), metadata=bearer(cleared.access_token)
    )
    assert [s.org_id for s in listed.sessions] == [""]
    # Clearing when there is none is fine too.
    again = await set_active_org(
        api, (await refreshed(api, cleared.refresh_token)).refresh_token, ""
    )
    _assert_no_org(again.access_token)
    assert org.id


async def test_switching_between_orgs(api: Api) -> None:
    first, owner = await org_with_owner(api)
    second = await _create_org(api, owner.token)
    await api.orgs.AddMember(
        orgs_pb2.AddMemberRequest(org_id=first.id, user_id=(await api.sign_up()).user.id),
        metadata=owner.md,
    )
    pair = await set_active_org(api, owner.tokens.refresh_token, second.id)
    _assert_in_org(pair.access_token, second.id, OWNER)
    assert await _session_org(api, pair.access_token) == (second.id, OWNER)
    pair = await set_active_org(api, pair.refresh_token, first.id)
    _assert_in_org(pair.access_token, first.id, OWNER)
    assert await _session_org(api, pair.access_token) == (first.id, OWNER)


async def test_older_tokens_of_the_session_follow_the_switch(api: Api) -> None:
    """Authenticate reads the live session: after a switch, the session's
    older access tokens resolve to its new active org, whether or not
    Authenticate has seen them before (its cache must not keep the old org)."""
    first, owner = await org_with_owner(api)
    seen = owner.tokens
    unseen = await refreshed(api, seen.refresh_token)
    second = await _create_org(api, seen.access_token)
    # Authenticate has seen one of the two, and nothing happened since.
    assert await _session_org(api, seen.access_token) == (first.id, OWNER)

    await set_active_org(api, unseen.refresh_token, second.id)

    answers = {
        "unseen": await _session_org(api, unseen.access_token),
        "seen": await _session_org(api, seen.access_token),
    }
    assert answers == {"unseen": (second.id, OWNER), "seen": (second.id, OWNER)}


async def test_the_active_org_survives_every_refresh(api: Api) -> None:
    """Seed 000 dropped the active org at the first refresh."""
    org, member = await _member_of_new_org(api, ADMIN)
    pair = member.tokens
    for _ in range(4):
        pair = await refreshed(api, pair.refresh_token)
        _assert_in_org(pair.access_token, org.id, ADMIN)
        assert await _session_org(api, pair.access_token) == (org.id, ADMIN)
    # And the session still acts in the org with the latest token.
    got = await api.orgs.GetOrg(
        orgs_pb2.GetOrgRequest(org_id=org.id), metadata=bearer(pair.access_token)
    )
    assert got.org.id == org.id


async def test_the_active_org_belongs_to_the_session(api: Api) -> None:
    org, owner = await org_with_owner(api)
    other = await _sign_in(api, owner.user.email)
    assert await _session_org(api, other.access_token) == ("", NO_ROLE)
    _assert_no_org((await refreshed(api, other.refresh_token)).access_token)
    assert await _session_org(api, owner.token) == (org.id, OWNER)


async def test_a_spent_token_within_grace_gets_the_current_pair_with_the_org(api: Api) -> None:
    created = await api.sign_up()
    org = await _create_org(api, created.tokens.access_token)
    pair = await set_active_org(api, created.tokens.refresh_token, org.id)
    # The other browser tab refreshes with the token it still holds.
    late = await refreshed(api, created.tokens.refresh_token)
    assert late.refresh_token == pair.refresh_token
    _assert_in_org(late.access_token, org.id, OWNER)


@pytest.mark.parametrize("presented_to", ["RefreshToken", "SetActiveOrg"])
async def test_the_old_refresh_token_after_grace_is_reuse(
    own_server: Callable[..., Awaitable[Api]], presented_to: str
) -> None:
    api = await own_server(**NO_GRACE)  # no grace interval to wait out
    created = await api.sign_up()
    org = await _create_org(api, created.tokens.access_token)
    pair = await set_active_org(api, created.tokens.refresh_token, org.id)

    old = created.tokens.refresh_token
    call: Any
    if presented_to == "RefreshToken":
        call = api.auth.RefreshToken(auth_pb2.RefreshTokenRequest(refresh_token=old))
    else:
        call = api.auth.SetActiveOrg(auth_pb2.SetActiveOrgRequest(refresh_token=old, org_id=org.id))
    error = await failure(call)
    assert (error.code, error.reason) == REUSED

    # The whole session is revoked, the newest pair included.
    for token in (created.tokens.access_token, pair.access_token):
        error = await failure(who(api, token))
        assert (error.code, error.reason) == REVOKED
    error = await failure(refreshed(api, pair.refresh_token))
    assert (error.code, error.reason) == REVOKED
    error = await failure(
        api.auth.SetActiveOrg(
            auth_pb2.SetActiveOrgRequest(refresh_token=pair.refresh_token, org_id="")
        )
    )
    assert (error.code, error.reason) == REVOKED


async def test_a_signed_out_session_cannot_switch(api: Api) -> None:
    org, owner = await org_with_owner(api)
    await api.auth.SignOut(auth_pb2.SignOutRequest(), metadata=owner.md)
    await refused(
        api,
        lambda: api.auth.SetActiveOrg(
            auth_pb2.SetActiveOrgRequest(refresh_token=owner.tokens.refresh_token, org_id=org.id)
        ),
        *REVOKED,
    )


# -- naming the org: by id or by slug ------------------------------------------------


def _switch(refresh_token: str, by: str, org: Any) -> auth_pb2.SetActiveOrgRequest:
    """SetActiveOrg to ``org`` by its ``org_id`` or its ``org_slug``."""
    if by == "org_id":
        return auth_pb2.SetActiveOrgRequest(refresh_token=refresh_token, org_id=org.id)
    assert by == "org_slug"
    return auth_pb2.SetActiveOrgRequest(refresh_token=refresh_token, org_slug=org.slug)


async def _switched(api: Api, request: auth_pb2.SetActiveOrgRequest) -> Any:
    response = await api.auth.SetActiveOrg(request)
    remember(response.tokens.access_token, response.tokens.refresh_token)
    return response.tokens


@pytest.mark.parametrize("by", ["org_id", "org_slug"])
async def test_switch_by_id_or_by_slug(api: Api, by: str) -> None:
    created = await api.sign_up()
    first = await _create_org(api, created.tokens.access_token)
    second = await _create_org(api, created.tokens.access_token)

    pair = await _switched(api, _switch(created.tokens.refresh_token, by, first))
    assert pair.session_id == created.tokens.session_id
    _assert_in_org(pair.access_token, first.id, OWNER)
    assert await _session_org(api, pair.access_token) == (first.id, OWNER)
    old_ver = _ver(pair.access_token)

    pair = await _switched(api, _switch(pair.refresh_token, by, second))
    _assert_in_org(pair.access_token, second.id, OWNER)
    assert await _session_org(api, pair.access_token) == (second.id, OWNER)
    assert _ver(pair.access_token) > old_ver
    # It stays: a refresh keeps the org switched to.
    _assert_in_org((await refreshed(api, pair.refresh_token)).access_token, second.id, OWNER)


@pytest.mark.parametrize("how", ["unset", "empty_org_id", "empty_org_slug"])
async def test_clearing_the_active_org(api: Api, how: str) -> None:
    org, owner = await org_with_owner(api)
    request = auth_pb2.SetActiveOrgRequest(refresh_token=owner.tokens.refresh_token)
    if how == "empty_org_id":
        request.org_id = ""
    elif how == "empty_org_slug":
        request.org_slug = ""
    # What is sent is what the case says: the oneof's case travels on the
    # wire even with an empty value.
    case = {"unset": None, "empty_org_id": "org_id", "empty_org_slug": "org_slug"}[how]
    wire = auth_pb2.SetActiveOrgRequest.FromString(request.SerializeToString())
    assert wire.WhichOneof("org") == request.WhichOneof("org") == case

    pair = await _switched(api, request)

    assert pair.session_id == owner.tokens.session_id
    _assert_no_org(pair.access_token)
    assert _ver(pair.access_token) > _ver(owner.token)
    assert await _session_org(api, pair.access_token) == ("", NO_ROLE)
    assert await _session_org(api, owner.token) == ("", NO_ROLE)
    _assert_no_org((await refreshed(api, pair.refresh_token)).access_token)
    assert org.id


@pytest.mark.parametrize("slug_of", ["unknown", "not_a_member"])
async def test_a_slug_the_user_cannot_switch_to_is_member_not_found(api: Api, slug_of: str) -> None:
    org, _ = await org_with_owner(api)
    outsider = await api.sign_up()
    slug = org.slug if slug_of == "not_a_member" else new_slug("nobody")
    request = auth_pb2.SetActiveOrgRequest(
        refresh_token=outsider.tokens.refresh_token, org_slug=slug
    )
    await refused(api, partial(api.auth.SetActiveOrg, request), *MEMBER_NOT_FOUND)
    # Nothing was spent: the refresh token still works, and carries no org.
    _assert_no_org((await refreshed(api, outsider.tokens.refresh_token)).access_token)


@contextmanager
def _statements(api: Api) -> Iterator[list[str]]:
    """The SQL statements (text, not parameters) the server runs meanwhile on
    the tables of users, sessions and orgs (not the event relay's)."""
    seen: list[str] = []

    def record(*args: Any) -> None:
        statement = str(args[2])
        if not re.search(r"\b(events|event_log_head|signing_keys)\b", statement):
            seen.append(statement)

    engine = api.server.core.db.engine.sync_engine
    event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", record)


async def test_an_unknown_slug_fails_like_an_org_the_user_is_not_in(api: Api) -> None:
    """The same answer after the same work: the same statements, in the same
    order (so the same round trips and lock waits), whether the slug names an
    org or not; only their parameters differ."""
    org, _ = await org_with_owner(api)
    outsider = await api.sign_up()
    answers: dict[str, tuple[Any, ...]] = {}
    traces: dict[str, list[str]] = {}
    for name, slug in (("not_a_member", org.slug), ("unknown", new_slug("nobody"))) * 2:
        with _statements(api) as seen:
            error = await failure(
                api.auth.SetActiveOrg(
                    auth_pb2.SetActiveOrgRequest(
                        refresh_token=outsider.tokens.refresh_token, org_slug=slug
                    )
                )
            )
        answers[name] = (error.code, error.reason, error.message)
        traces[name] = seen
    assert answers["unknown"] == answers["not_a_member"]
    assert answers["unknown"][:2] == MEMBER_NOT_FOUND
    assert traces["unknown"] == traces["not_a_member"]
    # The trace does see the work: the org lookups and the membership check.
    assert sum("orgs" in s for s in traces["unknown"]) >= 2
    assert any("memberships" in s for s in traces["unknown"])


async def test_a_slug_names_the_org_that_has_it_now(api: Api) -> None:
    org, owner = await org_with_owner(api)
    member = await org_member(api, org.id, MEMBER)
    cleared = await set_active_org(api, member.tokens.refresh_token, "")
    old_slug, slug = org.slug, new_slug("renamed")
    await api.orgs.UpdateOrg(
        orgs_pb2.UpdateOrgRequest(
            org_id=org.id,
            values=resources_pb2.Org(slug=slug),
            update_mask=FieldMask(paths=["slug"]),
        ),
        metadata=service(),
    )
    await refused(
        api,
        partial(
            api.auth.SetActiveOrg,
            auth_pb2.SetActiveOrgRequest(refresh_token=cleared.refresh_token, org_slug=old_slug),
        ),
        *MEMBER_NOT_FOUND,
    )
    pair = await _switched(
        api, auth_pb2.SetActiveOrgRequest(refresh_token=cleared.refresh_token, org_slug=slug)
    )
    _assert_in_org(pair.access_token, org.id, MEMBER)
    assert owner.id


BAD_SLUGS = {
    "uppercase": "Acme",
    "too-short": "ab",
    "too-long": "a" * 64,
    "space": "acme corp",
    "underscore": "acme_corp",
    "unicode": "\u00e4cme",
    "newline": "acme\n",
    "huge": "a" * 100_000,
}
BAD_IDS = {
    "not-a-uuid": "acme",
    "no-hyphens": uuid.uuid4().hex,
    "braces": "{" + str(uuid.uuid4()) + "}",
}


@pytest.mark.parametrize(
    ("field", "value"),
    [pytest.param("org_slug", v, id=f"slug-{k}") for k, v in BAD_SLUGS.items()]
    + [pytest.param("org_id", v, id=f"id-{k}") for k, v in BAD_IDS.items()],
)
async def test_a_malformed_org_is_invalid_argument(api: Api, field: str, value: str) -> None:
    created = await api.sign_up()
    request = auth_pb2.SetActiveOrgRequest(refresh_token=created.tokens.refresh_token)
    setattr(request, field, value)
    error = await refused(
        api,
        partial(api.auth.SetActiveOrg, request),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
    )
    bad_request = error.detail(error_details_pb2.BadRequest)
    assert bad_request is not None, "no google.rpc.BadRequest detail"
    assert [v.field for v in bad_request.field_violations] == [field]
    # Refused before the refresh token was looked at: it still works.
    _assert_no_org((await refreshed(api, created.tokens.refresh_token)).access_token)


# -- membership changes reach the session --------------------------------------------


async def _member_of_new_org(api: Api, role: OrgRole) -> tuple[Any, OrgUser]:
    org, _ = await org_with_owner(api)
    member = await org_member(api, org.id, role)
    return org, member


async def test_a_removed_membership_leaves_the_session_without_an_org_at_once(api: Api) -> None:
    org, member = await _member_of_new_org(api, ADMIN)
    # Warm the Authenticate cache: the removal must beat it.
    assert await _session_org(api, member.token) == (org.id, ADMIN)
    old_ver = _ver(member.token)

    await api.orgs.RemoveMember(
        orgs_pb2.RemoveMemberRequest(org_id=org.id, user_id=member.id), metadata=service()
    )

    session = await who(api, member.token)
    assert (session.user_id, session.org_id, session.org_role) == (member.id, "", NO_ROLE)
    pair = await refreshed(api, member.tokens.refresh_token)
    _assert_no_org(pair.access_token)
    assert _ver(pair.access_token) > old_ver
    assert await _session_org(api, pair.access_token) == ("", NO_ROLE)
    # Added back, the session does not silently regain the org: it must switch.
    await api.orgs.AddMember(
        orgs_pb2.AddMemberRequest(org_id=org.id, user_id=member.id), metadata=service()
    )
    assert await _session_org(api, pair.access_token) == ("", NO_ROLE)
    pair = await set_active_org(api, pair.refresh_token, org.id)
    _assert_in_org(pair.access_token, org.id, MEMBER)


@pytest.mark.parametrize(
    ("start", "end"),
    [(MEMBER, ADMIN), (ADMIN, MEMBER), (MEMBER, OWNER), (OWNER, ADMIN)],
    ids=["member-to-admin", "admin-to-member", "member-to-owner", "owner-to-admin"],
)
async def test_a_role_change_reaches_the_session_at_once(
    api: Api, start: OrgRole, end: OrgRole
) -> None:
    org, member = await _member_of_new_org(api, start)
    assert await _session_org(api, member.token) == (org.id, start)
    old_ver = _ver(member.token)

    await api.orgs.UpdateMember(
        orgs_pb2.UpdateMemberRequest(org_id=org.id, user_id=member.id, role=end),
        metadata=service(),
    )

    assert await _session_org(api, member.token) == (org.id, end)
    pair = await refreshed(api, member.tokens.refresh_token)
    _assert_in_org(pair.access_token, org.id, end)
    assert _ver(pair.access_token) > old_ver
    assert await _session_org(api, pair.access_token) == (org.id, end)


async def test_every_live_session_of_the_member_sees_the_change(api: Api) -> None:
    org, member = await _member_of_new_org(api, MEMBER)
    second = await set_active_org(
        api, (await _sign_in(api, member.user.email)).refresh_token, org.id
    )
    old_vers = (_ver(member.token), _ver(second.access_token))
    await api.orgs.UpdateMember(
        orgs_pb2.UpdateMemberRequest(org_id=org.id, user_id=member.id, role=ADMIN),
        metadata=service(),
    )
    for token in (member.token, second.access_token):
        assert await _session_org(api, token) == (org.id, ADMIN)
    for old_ver, refresh_token in zip(
        old_vers, (member.tokens.refresh_token, second.refresh_token), strict=True
    ):
        pair = await refreshed(api, refresh_token)
        _assert_in_org(pair.access_token, org.id, ADMIN)
        assert _ver(pair.access_token) > old_ver


async def test_a_platform_role_change_bumps_ver(api: Api) -> None:
    org, member = await _member_of_new_org(api, MEMBER)
    old_ver = _ver(member.token)
    await api.users.SetUserRole(
        users_pb2.SetUserRoleRequest(user_id=member.id, role=resources_pb2.ROLE_ADMIN),
        metadata=service(),
    )
    pair = await refreshed(api, member.tokens.refresh_token)
    payload = _assert_in_org(pair.access_token, org.id, MEMBER)
    assert payload["role"] == "admin"
    assert _ver(pair.access_token) > old_ver


async def test_an_unrelated_change_does_not_touch_the_session(api: Api) -> None:
    """Another member's role change leaves this member's claims alone."""
    org, member = await _member_of_new_org(api, MEMBER)
    other = await org_member(api, org.id, MEMBER)
    await api.orgs.UpdateMember(
        orgs_pb2.UpdateMemberRequest(org_id=org.id, user_id=other.id, role=ADMIN),
        metadata=service(),
    )
    assert await _session_org(api, member.token) == (org.id, MEMBER)
    pair = await refreshed(api, member.tokens.refresh_token)
    _assert_in_org(pair.access_token, org.id, MEMBER)
    assert _ver(pair.access_token) == _ver(member.token)
