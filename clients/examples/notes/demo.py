"""``python -m examples.notes.demo``: a walk through the notes service as two users.

Signs up Ada and Bob on authsvc, gives each an org, and calls the notes
service the way a caller should: through ``AuthsvcClient`` for authsvc and a
channel with the tenant-scoping interceptor for notes. Prints what happens.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import uuid

import grpc

from authsvc_client.client import AuthsvcClient, SignInChallenge
from authsvc_client.errors import AuthsvcError, from_rpc_error
from authsvc_client.scoping import aio_interceptors, token_credentials
from authsvc_client.v1.resources_pb2 import SignInRequirement

from . import notes_pb2, notes_pb2_grpc

PASSWORD = "correct horse battery staple"  # noqa: S105 (a demo account's)


async def run(authsvc: str, notes_target: str) -> None:
    async with AuthsvcClient(authsvc) as auth:
        tag = uuid.uuid4().hex[:8]
        people = {}
        for name in ("ada", "bob"):
            outcome = await auth.sign_up(
                email=f"{name}-{tag}@example.com", password=PASSWORD, given_name=name.title()
            )
            # Every sign-in answers tokens or a challenge; this demo cannot
            # answer one (a second factor, say), so it says so and stops.
            if isinstance(outcome, SignInChallenge):
                needs = [SignInRequirement.Name(r) for r in outcome.requirements]
                raise SystemExit(f"{name}: the sign-up needs more than a password: {needs}")
            org = await auth.create_org(
                name=f"{name.title()}'s org",
                slug=f"{name}-{tag}",
                access_token=outcome.tokens.access_token,
            )
            # The org becomes the session's active org: the new access token
            # carries it (its id and its slug).
            tokens = await auth.set_active_org(
                refresh_token=outcome.tokens.refresh_token, slug=org.slug
            )
            people[name] = (org, tokens)
            print(f"{name}: user {outcome.user.id}, active org {org.slug} ({org.id})")

    ada_org, ada_tokens = people["ada"]
    bob_org, _ = people["bob"]
    # Every call on this channel carries Ada's token and may only name her
    # active org, by id or by slug.
    credentials = token_credentials(ada_tokens.access_token)
    async with grpc.aio.insecure_channel(
        notes_target, interceptors=aio_interceptors(credentials)
    ) as channel:
        notes = notes_pb2_grpc.NotesStub(channel)
        created = await notes.CreateNote(
            notes_pb2.CreateNoteRequest(org_id=ada_org.id, title="hello", body="from Ada")
        )
        print(f"ada created note {created.note.id} in {ada_org.slug}")
        listed = await notes.ListNotes(notes_pb2.ListNotesRequest(org_slug=ada_org.slug))
        print(f"ada lists {[n.title for n in listed.notes]} (naming her org by slug)")
        for what, request in (
            ("by id", notes_pb2.ListNotesRequest(org_id=bob_org.id)),
            ("by slug", notes_pb2.ListNotesRequest(org_slug=bob_org.slug)),
        ):
            try:
                await notes.ListNotes(request)
            except grpc.aio.AioRpcError as rpc_error:
                error: AuthsvcError = from_rpc_error(rpc_error)
                where = "before sending" if error.metadata.get("origin") == "client" else "by notes"
                print(
                    f"ada listing bob's org {what}: refused {where}: "
                    f"{error.code.name} / {error.reason}"
                )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.notes.demo", description=__doc__)
    parser.add_argument("--authsvc", default="127.0.0.1:50051")
    parser.add_argument("--notes", default="127.0.0.1:50061")
    args = parser.parse_args(argv)
    asyncio.run(run(args.authsvc, args.notes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
