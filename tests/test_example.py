"""The notes example (clients/examples/notes) end to end: a real authsvc, the
sidecar in each mode, the notes server, real channels.

A member of org X cannot read or write org Y's notes by any route (naming Y
by id or by slug), and a revoked session is refused within the configured
time. Callers here use plain channels with their own ``authorization``
metadata (an attacker does not use our client interceptor): the server's own
checks are what is tested.
"""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask

from authsvc_client.errors import AuthsvcError, OrgMismatch, from_rpc_error
from authsvc_client.scoping import aio_interceptors
from authsvc_client.sidecar import AuthInterceptor, Sidecar
from authsvc_client.v1 import auth_pb2, orgs_pb2, resources_pb2
from examples.notes import demo, notes_pb2, notes_pb2_grpc
from examples.notes.service import NoteStore, build_server
from tests.app import (
    API_KEY,
    PASSWORD,
    Api,
    OrgUser,
    bearer,
    bounded_teardown,
    new_slug,
    org_member,
    org_with_owner,
    refreshed,
    remember,
    service,
    set_active_org,
    until_tokens_are_covered,
)

#: online mode: how long an Authenticate answer is reused
ONLINE_TTL = 1.0
#: watch mode: a long online cache, so that a refusal within WATCH_BOUND can
#: only have come through the revocation stream
WATCH_ONLINE_TTL = 60.0
WATCH_BOUND = 1.0
SLACK = 0.5
PD = grpc.StatusCode.PERMISSION_DENIED


@dataclass
class Notes:
    mode: str
    store: NoteStore
    stub: notes_pb2_grpc.NotesAsyncStub
    sidecar: Sidecar
    target: str

    @property
    def bound(self) -> float:
        """How soon after a revocation the service must refuse the session."""
        return ONLINE_TTL + SLACK if self.mode == "online" else WATCH_BOUND


@pytest.fixture(params=["watch", "online"])
async def notes(api: Api, request: pytest.FixtureRequest) -> AsyncIterator[Notes]:
    mode = str(request.param)
    sidecar = Sidecar(
        api.target,
        api_key=API_KEY,
        mode="online" if mode == "online" else "watch",
        online_cache_ttl=ONLINE_TTL if mode == "online" else WATCH_ONLINE_TTL,
        gap_margin=0.0,
    )
    await sidecar.start()
    if mode == "watch":
        # Tokens minted before the stream's first answer are checked online
        # (they may predate it): mint from when they are not.
        await until_tokens_are_covered(sidecar)
    store = NoteStore()
    server, port = build_server(store, sidecar=sidecar)
    await server.start()
    target = f"127.0.0.1:{port}"
    channel = grpc.aio.insecure_channel(target)
    try:
        yield Notes(mode, store, notes_pb2_grpc.NotesStub(channel), sidecar, target)
    finally:
        await bounded_teardown(channel.close(), "closing the notes channel")
        await bounded_teardown(server.stop(0), "stopping the notes server")
        await bounded_teardown(sidecar.close(), "closing the notes sidecar")


async def refused(call: Any) -> AuthsvcError:
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return from_rpc_error(error)
    raise AssertionError("the call succeeded")


def by(org: Any) -> dict[str, Any]:
    """The request's ``org`` oneof naming ``org`` (an Org) by slug rather than by id."""
    return {"org_slug": org.slug}


async def create(notes: Notes, who: OrgUser, org_id: str = "", title: str = "t", **org: str) -> Any:
    named = org or {"org_id": org_id}
    response = await notes.stub.CreateNote(
        notes_pb2.CreateNoteRequest(title=title, body="b", **named), metadata=who.md
    )
    return response.note


async def titles(
    notes: Notes, who: OrgUser, org_id: str = "", page_size: int = 0, **org: str
) -> list[str]:
    named = org or {"org_id": org_id}
    out, token = [], ""
    while True:
        page = await notes.stub.ListNotes(
            notes_pb2.ListNotesRequest(page_size=page_size, page_token=token, **named),
            metadata=who.md,
        )
        out += [n.title for n in page.notes]
        token = page.next_page_token
        if not token:
            return out


def counts(notes: Notes, *orgs: str) -> list[int]:
    return [notes.store.count(o) for o in orgs]


# -- the happy path ---------------------------------------------------------------


async def test_members_read_and_write_their_orgs_notes(api: Api, notes: Notes) -> None:
    org, owner = await org_with_owner(api)
    member = await org_member(api, org.id)
    admin = await org_member(api, org.id, resources_pb2.ORG_ROLE_ADMIN)
    made = [await create(notes, member, org.id, f"n{i}") for i in range(5)]
    assert {n.org_id for n in made} == {org.id}
    assert {n.author_user_id for n in made} == {member.id}
    assert await titles(notes, owner, org.id, page_size=2) == [f"n{i}" for i in range(5)]
    got = await notes.stub.GetNote(
        notes_pb2.GetNoteRequest(org_id=org.id, note_id=made[0].id), metadata=admin.md
    )
    assert got.note == made[0]

    # Delete: the author, or an org admin or owner; not another member.
    other = await org_member(api, org.id)
    error = await refused(
        notes.stub.DeleteNote(
            notes_pb2.DeleteNoteRequest(org_id=org.id, note_id=made[0].id), metadata=other.md
        )
    )
    assert error.code == PD
    for who, note in ((member, made[0]), (admin, made[1]), (owner, made[2])):
        await notes.stub.DeleteNote(
            notes_pb2.DeleteNoteRequest(org_id=org.id, note_id=note.id), metadata=who.md
        )
    assert await titles(notes, other, org.id) == ["n3", "n4"]


async def test_the_org_may_be_named_by_its_slug(api: Api, notes: Notes) -> None:
    """Every request names the org by id or by slug (its `org` oneof): the
    same notes either way, the slug checked against the token's."""
    org, owner = await org_with_owner(api)
    member = await org_member(api, org.id)
    note = await create(notes, member, title="by slug", **by(org))
    assert (note.org_id, note.author_user_id) == (org.id, member.id)
    await create(notes, owner, org.id, "by id")
    assert await titles(notes, owner, **by(org)) == ["by slug", "by id"]
    assert await titles(notes, member, org.id, page_size=1) == ["by slug", "by id"]
    got = await notes.stub.GetNote(
        notes_pb2.GetNoteRequest(note_id=note.id, **by(org)), metadata=owner.md
    )
    assert got.note == note
    await notes.stub.DeleteNote(
        notes_pb2.DeleteNoteRequest(note_id=note.id, **by(org)), metadata=member.md
    )
    assert await titles(notes, owner, **by(org)) == ["by id"]
    # A slug is compared exactly: another spelling is no org of the session's.
    error = await refused(
        notes.stub.ListNotes(
            notes_pb2.ListNotesRequest(org_slug=org.slug.upper()), metadata=owner.md
        )
    )
    assert isinstance(error, OrgMismatch)


# -- isolation ------------------------------------------------------------------


def _x_then_y(org_x: Any, org_y: Any) -> notes_pb2.ListNotesRequest:
    request = notes_pb2.ListNotesRequest(org_id=org_x.id)
    request.org_slug = org_y.slug  # the oneof now names Y, by slug; org_id is cleared
    assert request.WhichOneof("org") == "org_slug"
    return request


async def test_a_member_of_x_cannot_reach_y_by_any_route(api: Api, notes: Notes) -> None:
    org_x, alice = await org_with_owner(api)
    org_y, bob = await org_with_owner(api)
    y_note = await create(notes, bob, org_y.id, "secret")
    x_note = await create(notes, alice, org_x.id, "mine")
    before = counts(notes, org_x.id, org_y.id)
    stub, md = notes.stub, alice.md

    # Y named in the request: ORG_MISMATCH, whatever else the request says.
    for call in (
        stub.CreateNote(notes_pb2.CreateNoteRequest(org_id=org_y.id, title="x"), metadata=md),
        stub.ListNotes(notes_pb2.ListNotesRequest(org_id=org_y.id), metadata=md),
        stub.GetNote(notes_pb2.GetNoteRequest(org_id=org_y.id, note_id=y_note.id), metadata=md),
        stub.GetNote(notes_pb2.GetNoteRequest(org_id=org_y.id, note_id=x_note.id), metadata=md),
        stub.DeleteNote(
            notes_pb2.DeleteNoteRequest(org_id=org_y.id, note_id=y_note.id), metadata=md
        ),
        # Y named by its slug.
        stub.CreateNote(notes_pb2.CreateNoteRequest(title="x", **by(org_y)), metadata=md),
        stub.ListNotes(notes_pb2.ListNotesRequest(**by(org_y)), metadata=md),
        stub.GetNote(notes_pb2.GetNoteRequest(note_id=y_note.id, **by(org_y)), metadata=md),
        stub.DeleteNote(notes_pb2.DeleteNoteRequest(note_id=y_note.id, **by(org_y)), metadata=md),
        # The oneof holds one org: naming Y's slug after X's id names Y.
        stub.ListNotes(_x_then_y(org_x, org_y), metadata=md),
        # X's slug where an id goes, X's id where a slug goes.
        stub.ListNotes(notes_pb2.ListNotesRequest(org_id=org_x.slug), metadata=md),
        stub.ListNotes(notes_pb2.ListNotesRequest(org_slug=org_x.id), metadata=md),
        # No org named at all, or an empty one.
        stub.ListNotes(notes_pb2.ListNotesRequest(org_slug=""), metadata=md),
        stub.GetNote(notes_pb2.GetNoteRequest(note_id=y_note.id), metadata=md),
        stub.ListNotes(notes_pb2.ListNotesRequest(), metadata=md),
        stub.CreateNote(notes_pb2.CreateNoteRequest(title="x"), metadata=md),
    ):
        error = await refused(call)
        assert isinstance(error, OrgMismatch), error
        assert (error.code, error.reason) == (PD, "ORG_MISMATCH")

    # X named, with Y's note id: not found, like an id that never existed.
    for call in (
        stub.GetNote(notes_pb2.GetNoteRequest(org_id=org_x.id, note_id=y_note.id), metadata=md),
        stub.GetNote(notes_pb2.GetNoteRequest(note_id=y_note.id, **by(org_x)), metadata=md),
        stub.DeleteNote(
            notes_pb2.DeleteNoteRequest(org_id=org_x.id, note_id=y_note.id), metadata=md
        ),
    ):
        assert (await refused(call)).code == grpc.StatusCode.NOT_FOUND
    # X's list holds X's notes only.
    assert await titles(notes, alice, org_x.id) == ["mine"]
    # Nothing changed; Y's note is still Bob's to read.
    assert counts(notes, org_x.id, org_y.id) == before
    got = await stub.GetNote(
        notes_pb2.GetNoteRequest(org_id=org_y.id, note_id=y_note.id), metadata=bob.md
    )
    assert got.note.title == "secret"


async def test_without_an_active_org_nothing_is_reachable(api: Api, notes: Notes) -> None:
    org, owner = await org_with_owner(api)
    note = await create(notes, owner, org.id)
    # The owner's other session, which has no active org, and a user of no org.
    signed = await api.auth.SignInWithPassword(
        auth_pb2.SignInWithPasswordRequest(email=owner.user.email, password=PASSWORD)
    )
    remember(signed.result.tokens.access_token, signed.result.tokens.refresh_token)
    stranger = await api.sign_up()
    for token in (signed.result.tokens.access_token, stranger.tokens.access_token):
        md = bearer(token)
        for org_id in (org.id, ""):
            for call in (
                notes.stub.CreateNote(
                    notes_pb2.CreateNoteRequest(org_id=org_id, title="x"), metadata=md
                ),
                notes.stub.ListNotes(notes_pb2.ListNotesRequest(org_id=org_id), metadata=md),
                notes.stub.GetNote(
                    notes_pb2.GetNoteRequest(org_id=org_id, note_id=note.id), metadata=md
                ),
                notes.stub.DeleteNote(
                    notes_pb2.DeleteNoteRequest(org_id=org_id, note_id=note.id), metadata=md
                ),
            ):
                assert isinstance(await refused(call), OrgMismatch)
    assert counts(notes, org.id) == [1]


async def test_a_switched_token_reaches_only_its_new_org(api: Api, notes: Notes) -> None:
    org_x, _ = await org_with_owner(api)
    org_y, bob = await org_with_owner(api)
    alice = await org_member(api, org_x.id)  # her session: X active
    await api.orgs.AddMember(
        orgs_pb2.AddMemberRequest(org_id=org_y.id, user_id=alice.id), metadata=service()
    )
    x_note = await create(notes, alice, org_x.id, "x")
    await create(notes, bob, org_y.id, "y")
    assert await titles(notes, alice, org_x.id) == ["x"]  # (and cached by the sidecar)

    # Switch the session to Y: the new token reaches Y and not X.
    tokens_y = await set_active_org(api, alice.tokens.refresh_token, org_y.id)
    as_y = OrgUser(alice.user, tokens_y)
    assert await titles(notes, as_y, org_y.id) == ["y"]
    for call in (
        notes.stub.ListNotes(notes_pb2.ListNotesRequest(org_id=org_x.id), metadata=as_y.md),
        notes.stub.GetNote(
            notes_pb2.GetNoteRequest(org_id=org_x.id, note_id=x_note.id), metadata=as_y.md
        ),
    ):
        assert isinstance(await refused(call), OrgMismatch)
    # X's note id with Y named: not found.
    get_x_in_y = notes.stub.GetNote(
        notes_pb2.GetNoteRequest(org_id=org_y.id, note_id=x_note.id), metadata=as_y.md
    )
    assert (await refused(get_x_in_y)).code == grpc.StatusCode.NOT_FOUND

    # The token minted while X was active no longer acts in X once the
    # session has left it: the switch raised the session's claims version, so
    # the watch stream marks that token stale (TOKEN_STALE); online,
    # Authenticate shows the session in Y (ORG_MISMATCH). Within the bound.
    _, error = await _until_refused(notes, lambda: titles(notes, alice, org_x.id), notes.bound)
    expected = {
        "watch": (grpc.StatusCode.UNAUTHENTICATED, "TOKEN_STALE"),
        "online": (PD, "ORG_MISMATCH"),
    }[notes.mode]
    assert (error.code, error.reason) == expected

    # Removed from X, she cannot switch back; her session still reaches Y only.
    await api.orgs.RemoveMember(
        orgs_pb2.RemoveMemberRequest(org_id=org_x.id, user_id=alice.id), metadata=service()
    )
    fresh = OrgUser(alice.user, await refreshed(api, tokens_y.refresh_token))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await set_active_org(api, fresh.tokens.refresh_token, org_x.id)
    assert from_rpc_error(raised.value).reason == "MEMBER_NOT_FOUND"
    assert await titles(notes, fresh, org_y.id) == ["y"]
    assert isinstance(
        await refused(
            notes.stub.ListNotes(notes_pb2.ListNotesRequest(org_id=org_x.id), metadata=fresh.md)
        ),
        OrgMismatch,
    )


async def test_a_forged_org_claim_is_refused(api: Api, notes: Notes) -> None:
    _, alice = await org_with_owner(api)
    org_y, bob = await org_with_owner(api)
    await create(notes, bob, org_y.id, "y")
    header, payload, signature = alice.token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["org_id"] = org_y.id
    forged_payload = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    forged = f"{header}.{forged_payload}.{signature}"
    error = await refused(
        notes.stub.ListNotes(notes_pb2.ListNotesRequest(org_id=org_y.id), metadata=bearer(forged))
    )
    assert (error.code, error.reason) == (grpc.StatusCode.UNAUTHENTICATED, "TOKEN_INVALID")
    error = await refused(notes.stub.ListNotes(notes_pb2.ListNotesRequest(org_id=org_y.id)))
    assert (error.code, error.reason) == (grpc.StatusCode.UNAUTHENTICATED, "NOT_AUTHENTICATED")


async def test_a_slug_change_reaches_the_service(api: Api, notes: Notes) -> None:
    """UpdateOrg gives the org a new slug. The owner's older token carries the
    old one: in watch mode it is stale at once (the rename is a claims
    change), so it must be refreshed; online, the sidecar sees the live
    session and its new slug. The refreshed token acts by the new slug and no
    longer by the old one, in both modes."""
    org, owner = await org_with_owner(api)
    await create(notes, owner, title="t", **by(org))
    renamed = new_slug()
    await api.orgs.UpdateOrg(
        orgs_pb2.UpdateOrgRequest(
            org_id=org.id,
            values=resources_pb2.Org(slug=renamed),
            update_mask=FieldMask(paths=["slug"]),
        ),
        metadata=service(),
    )
    old_slug: dict[str, Any] = {"org_slug": org.slug}
    _, error = await _until_refused(notes, lambda: titles(notes, owner, **old_slug), notes.bound)
    expected = {
        "watch": (grpc.StatusCode.UNAUTHENTICATED, "TOKEN_STALE"),
        "online": (PD, "ORG_MISMATCH"),
    }[notes.mode]
    assert (error.code, error.reason) == expected
    if notes.mode == "online":
        assert await titles(notes, owner, org_slug=renamed) == ["t"]  # the live slug

    fresh = OrgUser(owner.user, await refreshed(api, owner.tokens.refresh_token))
    assert await titles(notes, fresh, org_slug=renamed) == ["t"]
    assert await titles(notes, fresh, org.id) == ["t"]
    error = await refused(
        notes.stub.ListNotes(notes_pb2.ListNotesRequest(**old_slug), metadata=fresh.md)
    )
    assert isinstance(error, OrgMismatch)


# -- revocation -----------------------------------------------------------------


async def _until_refused(notes: Notes, call: Any, bound: float) -> tuple[float, AuthsvcError]:
    """Repeats ``call`` until it fails; returns how long that took and the error."""
    started = time.monotonic()
    while True:
        try:
            await call()
        except grpc.aio.AioRpcError as error:
            return time.monotonic() - started, from_rpc_error(error)
        elapsed = time.monotonic() - started
        assert elapsed <= bound, f"{notes.mode}: still served {elapsed:.2f} s later"
        await asyncio.sleep(0.01)


async def test_a_revoked_session_is_refused_within_the_configured_time(
    api: Api, notes: Notes
) -> None:
    org, owner = await org_with_owner(api)
    await create(notes, owner, org.id)
    assert await titles(notes, owner, org.id) == ["t"]  # served (and cached) before

    await api.auth.SignOut(auth_pb2.SignOutRequest(), metadata=owner.md)
    elapsed, error = await _until_refused(notes, lambda: titles(notes, owner, org.id), notes.bound)
    assert (error.code, error.reason) == (grpc.StatusCode.UNAUTHENTICATED, "SESSION_REVOKED")
    print(f"\n{notes.mode} mode ({api.backend}): SignOut -> refusal in {elapsed * 1000:.1f} ms")
    # Refused for good.
    error = await refused(
        notes.stub.ListNotes(notes_pb2.ListNotesRequest(org_id=org.id), metadata=owner.md)
    )
    assert error.reason == "SESSION_REVOKED"


# -- identity propagated downstream -------------------------------------------------

FRONT = "/front.v1.Front/CreateNote"


async def test_a_protected_service_calls_downstream_as_its_caller(api: Api, notes: Notes) -> None:
    """A "front" service behind the sidecar calls the notes service through the
    tenant-scoping interceptor with its default credentials: the caller's token
    goes downstream, and a request naming another org never leaves the front."""
    downstream = grpc.aio.insecure_channel(notes.target, interceptors=aio_interceptors())
    notes_stub = notes_pb2_grpc.NotesStub(downstream)

    async def create_note(body: bytes, context: Any) -> bytes:
        request = notes_pb2.CreateNoteRequest.FromString(body)
        try:
            response = await notes_stub.CreateNote(request)
        except grpc.aio.AioRpcError as error:
            trailers = tuple(error.trailing_metadata() or ())
            await context.abort(error.code(), error.details() or "", trailers)
        return response.SerializeToString()

    front = grpc.aio.server(interceptors=[AuthInterceptor(notes.sidecar)])
    front.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "front.v1.Front", {"CreateNote": grpc.unary_unary_rpc_method_handler(create_note)}
            ),
        )
    )
    port = front.add_insecure_port("127.0.0.1:0")
    await front.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        org_x, alice = await org_with_owner(api)
        org_y, _ = await org_with_owner(api)
        call: Any = channel.unary_unary(FRONT)

        body = await call(
            notes_pb2.CreateNoteRequest(org_id=org_x.id, title="via front").SerializeToString(),
            metadata=alice.md,
        )
        note = notes_pb2.CreateNoteResponse.FromString(body).note
        assert (note.org_id, note.author_user_id) == (org_x.id, alice.id)

        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await call(
                notes_pb2.CreateNoteRequest(org_id=org_y.id, title="x").SerializeToString(),
                metadata=alice.md,
            )
        error = from_rpc_error(raised.value)
        assert isinstance(error, OrgMismatch)
        assert error.metadata["origin"] == "client"  # refused in the front, not downstream

        # By slug: checked against the slug the caller's token carries, as the
        # sidecar in front hands it on.
        body = await call(
            notes_pb2.CreateNoteRequest(title="by slug", **by(org_x)).SerializeToString(),
            metadata=alice.md,
        )
        assert notes_pb2.CreateNoteResponse.FromString(body).note.org_id == org_x.id
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await call(
                notes_pb2.CreateNoteRequest(title="x", **by(org_y)).SerializeToString(),
                metadata=alice.md,
            )
        error = from_rpc_error(raised.value)
        assert (error.reason, error.metadata["origin"]) == ("ORG_MISMATCH", "client")
        assert error.metadata["field"] == "notes.v1.CreateNoteRequest.org_slug"
        assert counts(notes, org_x.id, org_y.id) == [2, 0]
    finally:
        await channel.close()
        await front.stop(0)
        await downstream.close()


async def test_the_demo_walks_through(
    api: Api, notes: Notes, capsys: pytest.CaptureFixture[str]
) -> None:
    await demo.run(api.target, notes.target)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0].split(" ")[0] for line in lines] == ["ada", "bob"] + ["ada"] * 4
    assert lines[3] == "ada lists ['hello'] (naming her org by slug)"
    for what, line in zip(("by id", "by slug"), lines[4:], strict=True):
        assert line == (
            f"ada listing bob's org {what}: refused before sending: "
            "PERMISSION_DENIED / ORG_MISMATCH"
        )


def test_the_generated_notes_code_is_current() -> None:
    script = Path(__file__).resolve().parent.parent / "clients/examples/notes/generate.py"
    done = subprocess.run(
        [sys.executable, str(script), "--check"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
