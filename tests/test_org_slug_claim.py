"""The `org_slug` claim: a token acting in an org names it by id and by slug.

What this proves, as resources.proto and auth.proto state it: a session with an
active org gets access tokens whose `org_slug` claim is that org's slug, and
Authenticate's SessionInfo carries the slug the org has now. Renaming the slug
(UpdateOrg with `slug` in the mask) is a claims change for exactly the sessions
acting in that org: WatchRevocations tells local verifiers that their older
tokens are stale, Authenticate shows the new slug at once, and the next refresh
carries it. Sessions acting in another org, or in none, are left alone.

The token is checked with PyJWT against the server's JWKS: the claim is what a
verifier that is not authsvc reads.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
import jwt
from google.protobuf.field_mask_pb2 import FieldMask

from authsvc_client.v1 import auth_pb2, orgs_pb2, resources_pb2
from tests.app import (
    Api,
    new_slug,
    org_with_owner,
    refreshed,
    service,
    set_active_org,
    who,
)


async def _verified(api: Api, token: str) -> dict[str, Any]:
    """The token's claims, verified with PyJWT and the server's JWKS."""
    jwks = await api.auth.GetJwks(auth_pb2.GetJwksRequest())
    header = jwt.get_unverified_header(token)
    (key,) = [k for k in jwks.keys if k.kid == header["kid"]]
    public = jwt.PyJWK({"kty": key.kty, "crv": key.crv, "x": key.x, "kid": key.kid, "alg": key.alg})
    return dict(
        jwt.decode(
            token,
            public.key,
            algorithms=["EdDSA"],
            audience=api.settings.audience,
            issuer=api.settings.issuer,
        )
    )


async def _rename(api: Api, org_id: str, slug: str) -> resources_pb2.Org:
    response = await api.orgs.UpdateOrg(
        orgs_pb2.UpdateOrgRequest(
            org_id=org_id,
            values=resources_pb2.Org(slug=slug),
            update_mask=FieldMask(paths=["slug"]),
        ),
        metadata=service(),
    )
    return response.org


async def _events_until(stream: Any, sessions: set[str], within: float = 5.0) -> dict[str, Any]:
    """Reads the feed until each of ``sessions`` has an event; every event seen."""
    seen: dict[str, Any] = {}
    deadline = time.monotonic() + within
    while not sessions <= seen.keys():
        response = await asyncio.wait_for(stream.read(), max(0.01, deadline - time.monotonic()))
        assert response is not grpc.aio.EOF
        for event in response.revocations:
            seen.setdefault(event.session_id, []).append(event)
    return seen


async def test_a_token_acting_in_an_org_carries_its_slug(api: Api) -> None:
    slug = new_slug()
    org, owner = await org_with_owner(api, slug=slug)
    payload = await _verified(api, owner.token)
    assert (payload["org_id"], payload["org_slug"], payload["org_role"]) == (
        org.id,
        slug,
        "owner",
    )
    info = await who(api, owner.token)
    assert (info.org_id, info.org_slug) == (org.id, slug)


async def test_a_token_without_an_org_has_no_slug(api: Api) -> None:
    created = await api.sign_up()
    payload = await _verified(api, created.tokens.access_token)
    assert "org_slug" not in payload
    assert "org_id" not in payload
    assert (await who(api, created.tokens.access_token)).org_slug == ""


async def test_a_slug_change_reaches_the_sessions_acting_in_the_org(api: Api) -> None:
    org, owner = await org_with_owner(api)
    other_org, bystander = await org_with_owner(api)
    outsider = await api.sign_up()
    stream = api.auth.WatchRevocations(auth_pb2.WatchRevocationsRequest(), metadata=service())
    try:
        await asyncio.wait_for(stream.read(), 5)  # the (empty) replay
        old_version = (await _verified(api, owner.token))["ver"]
        renamed = new_slug("renamed")
        assert (await _rename(api, org.id, renamed)).slug == renamed

        # Local verifiers learn that the owner's older tokens are stale ...
        seen = await _events_until(stream, {owner.tokens.session_id})
        (event,) = seen[owner.tokens.session_id]
        assert event.kind == auth_pb2.REVOCATION_KIND_CLAIMS_CHANGED
        assert event.stale_below_version > old_version
        # ... and a marker event after the rename proves nobody else got one.
        await _rename(api, other_org.id, new_slug("marker"))
        seen.update(await _events_until(stream, {bystander.tokens.session_id}))
        assert outsider.tokens.session_id not in seen
    finally:
        stream.cancel()

    # Authenticate shows the new slug at once, for the token minted before.
    assert (await who(api, owner.token)).org_slug == renamed
    # The next refresh carries it, with the raised version.
    pair = await refreshed(api, owner.tokens.refresh_token)
    payload = await _verified(api, pair.access_token)
    assert (payload["org_slug"], payload["ver"]) == (renamed, event.stale_below_version)
    # The outsider's session was not touched.
    assert (await _verified(api, outsider.tokens.access_token))["ver"] == 0


async def test_a_name_change_is_not_a_claims_change(api: Api) -> None:
    org, owner = await org_with_owner(api)
    before = (await _verified(api, owner.token))["ver"]
    await api.orgs.UpdateOrg(
        orgs_pb2.UpdateOrgRequest(
            org_id=org.id,
            values=resources_pb2.Org(name="Renamed Inc"),
            update_mask=FieldMask(paths=["name"]),
        ),
        metadata=service(),
    )
    pair = await set_active_org(api, owner.tokens.refresh_token, org.id)
    assert (await _verified(api, pair.access_token))["ver"] == before


async def test_the_longest_token_bound_covers_the_longest_slug(api: Api) -> None:
    """A token with a 63-character slug still passes the server's length
    bound (checked before any decoding) and resolves."""
    slug = new_slug().ljust(63, "s")
    org, owner = await org_with_owner(api, slug=slug)
    assert org.slug == slug
    assert len(slug) == 63
    assert (await _verified(api, owner.token))["org_slug"] == slug
    assert (await who(api, owner.token)).org_slug == slug
