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

from authsvc_client.client import AuthsvcClient
from authsvc_client.errors import AuthsvcError, from_rpc_error
from authsvc_client.scoping import aio_interceptors, token_credentials

from . import notes_pb2, notes_pb2_grpc

PASSWORD = "correct horse battery staple"  # noqa: S105 (a demo account's)


async def run(authsvc: str, notes_target: str) -> None:
    async with AuthsvcClient(authsvc) as auth:
        tag = uuid.uuid4().hex[:8]
        people = {}
        for name in ("ada", "bob"):
            signed = await auth.sign_up(email=f"{name}-{tag}@example.com", password=PASSWORD)
            org = await auth.create_org(
                name=f"{name.title()}'s org",
                slug=f"{name}-{tag}",
                access_token=signed.tokens.access_token,
            )
            # The org becomes the session's active org: the new access token carries it.
            tokens = await auth.set_active_org(
                refresh_token=signed.tokens.refresh_token, org_id=org.id
            )
            people[name] = (org, tokens)
            print(f"{name}: user {signed.user.id}, active org {org.slug} ({org.id})")

    ada_org, ada_tokens = people["ada"]
    bob_org, _ = people["bob"]
    # Every call on this channel carries Ada's token and may only name her active org.
    credentials = token_credentials(ada_tokens.access_token)
    async with grpc.aio.insecure_channel(
        notes_target, interceptors=aio_interceptors(credentials)
    ) as channel:
        notes = notes_pb2_grpc.NotesStub(channel)
        created = await notes.CreateNote(
            notes_pb2.CreateNoteRequest(org_id=ada_org.id, title="hello", body="from Ada")
        )
        print(f"ada created note {created.note.id} in {ada_org.slug}")
        listed = await notes.ListNotes(notes_pb2.ListNotesRequest(org_id=ada_org.id))
        print(f"ada lists {[n.title for n in listed.notes]}")
        try:
            await notes.ListNotes(notes_pb2.ListNotesRequest(org_id=bob_org.id))
        except grpc.aio.AioRpcError as rpc_error:
            error: AuthsvcError = from_rpc_error(rpc_error)
            where = "before sending" if error.metadata.get("origin") == "client" else "by notes"
            print(f"ada listing bob's org: refused {where}: {error.code.name} / {error.reason}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.notes.demo", description=__doc__)
    parser.add_argument("--authsvc", default="127.0.0.1:50051")
    parser.add_argument("--notes", default="127.0.0.1:50061")
    args = parser.parse_args(argv)
    asyncio.run(run(args.authsvc, args.notes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
