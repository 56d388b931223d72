"""The notes service: an in-memory store keyed by org, the servicer, the server.

Tenancy is enforced twice, on purpose:

* The servicer never trusts the request's org alone. Each handler takes the
  caller's session from the sidecar (``current_session()``), checks that the
  request names the session's active org, by id or by slug (``assert_same_org``,
  against the ``org_id`` / ``org_slug`` the token carries: PERMISSION_DENIED /
  ORG_MISMATCH otherwise, and for a request naming no org), and then reads and
  writes the store under the *session's* org id.
* The store takes the org on every call and keeps each org's notes apart, so
  a note id of another org is simply not found (NOT_FOUND, the same answer
  as for an id that never existed: nothing leaks).
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from authsvc_client.errors import AuthsvcError, status_metadata
from authsvc_client.scoping import assert_same_org, is_org_authorized
from authsvc_client.sidecar import AuthInterceptor, Sidecar, current_session
from authsvc_client.v1 import resources_pb2

from . import notes_pb2, notes_pb2_grpc

Context = grpc.aio.ServicerContext[Any, Any]
SessionSource = Callable[[], resources_pb2.SessionInfo | None]
_R = TypeVar("_R")
_OrgRequest = (
    notes_pb2.CreateNoteRequest
    | notes_pb2.GetNoteRequest
    | notes_pb2.ListNotesRequest
    | notes_pb2.DeleteNoteRequest
)

MAX_TITLE = 200
MAX_BODY = 10_000
DEFAULT_PAGE = 50
MAX_PAGE = 500


@dataclass(frozen=True, slots=True)
class _Stored:
    seq: int
    note: notes_pb2.Note


class NoteStore:
    """Notes in memory, each org's apart. Thread-safe (the sync servers' handlers
    run on worker threads).

    Every method takes the org: there is no way to reach a note without
    naming the org it belongs to.
    """

    def __init__(self) -> None:
        self._orgs: dict[str, dict[str, _Stored]] = {}
        self._seq = 0
        self._lock = threading.Lock()

    def add(self, org_id: str, author_user_id: str, title: str, body: str) -> notes_pb2.Note:
        create_time = Timestamp()
        create_time.GetCurrentTime()
        note = notes_pb2.Note(
            id=str(uuid.uuid4()),
            org_id=org_id,
            author_user_id=author_user_id,
            title=title,
            body=body,
            create_time=create_time,
        )
        with self._lock:
            self._seq += 1
            self._orgs.setdefault(org_id, {})[note.id] = _Stored(self._seq, note)
        return note

    def get(self, org_id: str, note_id: str) -> notes_pb2.Note | None:
        stored = self._orgs.get(org_id, {}).get(note_id)
        return None if stored is None else stored.note

    def delete(self, org_id: str, note_id: str) -> bool:
        with self._lock:
            return self._orgs.get(org_id, {}).pop(note_id, None) is not None

    def page(self, org_id: str, after: int, size: int) -> tuple[list[notes_pb2.Note], int | None]:
        """Up to ``size`` notes with a sequence number above ``after``, oldest
        first, and the sequence number to continue after (None: no more)."""
        with self._lock:
            stored = [s for s in self._orgs.get(org_id, {}).values() if s.seq > after]
        stored.sort(key=lambda s: s.seq)
        page = stored[:size]
        more = len(stored) > size
        return [s.note for s in page], page[-1].seq if more and page else None

    def count(self, org_id: str) -> int:
        return len(self._orgs.get(org_id, {}))


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


async def _answer(context: Context, work: Callable[[], _R]) -> _R:
    """Runs a handler's work; maps refusals to statuses (authsvc's, for authsvc errors)."""
    try:
        return work()
    except AuthsvcError as error:
        await context.abort(
            error.code,
            error.message,
            status_metadata(error.code, error.reason, error.message),
        )
    except _Abort as abort:
        await context.abort(abort.code, abort.message)
    raise AssertionError("unreachable: abort raises")


class NotesServicer(notes_pb2_grpc.NotesServicer):
    """The handlers.

    Args:
        store: where notes live.
        session: who is calling; the sidecar's ``current_session`` (the
            benchmark's unprotected baseline passes a fixed session instead).
    """

    def __init__(self, store: NoteStore, *, session: SessionSource = current_session) -> None:
        self._store = store
        self._session = session

    def _tenant(self, request: _OrgRequest) -> resources_pb2.SessionInfo:
        """The caller, once the org the request names (its ``org`` oneof: an id
        or a slug) is checked against their active org.

        Raises:
            OrgMismatch: no session, no active org, no org named, or another org.
        """
        session = self._session()
        if request.WhichOneof("org") == "org_slug":
            assert_same_org(session, slug=request.org_slug)
        else:
            assert_same_org(session, request.org_id)  # unset: "" names no org
        assert session is not None
        return session

    async def CreateNote(
        self, request: notes_pb2.CreateNoteRequest, context: Context
    ) -> notes_pb2.CreateNoteResponse:
        def work() -> notes_pb2.CreateNoteResponse:
            session = self._tenant(request)
            if not 1 <= len(request.title) <= MAX_TITLE or len(request.body) > MAX_BODY:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "title or body out of bounds")
            note = self._store.add(session.org_id, session.user_id, request.title, request.body)
            return notes_pb2.CreateNoteResponse(note=note)

        return await _answer(context, work)

    async def GetNote(
        self, request: notes_pb2.GetNoteRequest, context: Context
    ) -> notes_pb2.GetNoteResponse:
        def work() -> notes_pb2.GetNoteResponse:
            session = self._tenant(request)
            note = self._store.get(session.org_id, request.note_id)
            if note is None:
                raise _Abort(grpc.StatusCode.NOT_FOUND, "no such note")
            return notes_pb2.GetNoteResponse(note=note)

        return await _answer(context, work)

    async def ListNotes(
        self, request: notes_pb2.ListNotesRequest, context: Context
    ) -> notes_pb2.ListNotesResponse:
        def work() -> notes_pb2.ListNotesResponse:
            session = self._tenant(request)
            if request.page_size < 0:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "page_size must not be negative")
            size = min(request.page_size or DEFAULT_PAGE, MAX_PAGE)
            token = request.page_token
            if token and not (token.isascii() and token.isdigit() and len(token) < 19):
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "malformed page_token")
            notes, after = self._store.page(session.org_id, int(token or 0), size)
            return notes_pb2.ListNotesResponse(
                notes=notes, next_page_token="" if after is None else str(after)
            )

        return await _answer(context, work)

    async def DeleteNote(
        self, request: notes_pb2.DeleteNoteRequest, context: Context
    ) -> notes_pb2.DeleteNoteResponse:
        def work() -> notes_pb2.DeleteNoteResponse:
            session = self._tenant(request)
            note = self._store.get(session.org_id, request.note_id)
            if note is None:
                raise _Abort(grpc.StatusCode.NOT_FOUND, "no such note")
            mine = note.author_user_id == session.user_id
            if not mine and not is_org_authorized(session, session.org_id, "owner", "admin"):
                raise _Abort(
                    grpc.StatusCode.PERMISSION_DENIED, "only its author or an org admin may"
                )
            self._store.delete(session.org_id, request.note_id)
            return notes_pb2.DeleteNoteResponse()

        return await _answer(context, work)


def build_server(
    store: NoteStore,
    *,
    sidecar: Sidecar | None,
    listen: str = "127.0.0.1:0",
    session: SessionSource = current_session,
    options: Iterable[tuple[str, Any]] = (),
    interceptors: Iterable[grpc.aio.ServerInterceptor] = (),
) -> tuple[grpc.aio.Server, int]:
    """A ``grpc.aio`` notes server (not started) and its port.

    Args:
        store: the notes.
        sidecar: a started sidecar; its ``AuthInterceptor`` guards every
            method. ``None`` only for the benchmark's unprotected baseline,
            which then passes ``session``.
        listen: host:port (port 0: any free port).
        session: see ``NotesServicer``.
        options: server channel arguments.
        interceptors: more server interceptors, after the sidecar's.
    """
    chain: list[grpc.aio.ServerInterceptor] = [AuthInterceptor(sidecar)] if sidecar else []
    chain += interceptors
    server = grpc.aio.server(interceptors=chain, options=list(options))
    notes_pb2_grpc.add_NotesServicer_to_server(NotesServicer(store, session=session), server)
    port = server.add_insecure_port(listen)
    if port == 0:
        raise RuntimeError(f"cannot listen on {listen}")
    return server, port


async def serve(
    authsvc: str,
    *,
    api_key: str | None,
    listen: str,
    mode: str = "watch",
    online_cache_ttl: float = 2.0,
    ready: Callable[[int], Awaitable[None] | None] | None = None,
) -> None:
    """Runs the notes service until cancelled: starts the sidecar, then the server."""
    sidecar = Sidecar(
        authsvc,
        api_key=api_key,
        mode="online" if mode == "online" else "watch",
        online_cache_ttl=online_cache_ttl,
    )
    await sidecar.start()
    try:
        server, port = build_server(NoteStore(), sidecar=sidecar, listen=listen)
        await server.start()
        try:
            if ready is not None:
                result = ready(port)
                if result is not None:
                    await result
            await server.wait_for_termination()
        finally:
            await server.stop(1.0)
    finally:
        await sidecar.close()
