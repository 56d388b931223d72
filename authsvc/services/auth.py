"""Sign-up, sign-in, refresh rotation, sign-out and Authenticate: the rules.

Knows nothing of gRPC or SQL: it talks to the ports in ``authsvc.domain.ports``
and raises the errors of ``authsvc.errors``.
"""

from __future__ import annotations

import hmac
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

import structlog

from authsvc.domain.events import CLAIMS_CHANGED, Event, claims_changed, session_revoked
from authsvc.domain.metrics import Metrics, NoMetrics, outcome
from authsvc.domain.models import ClientMeta, OrgRole, RefreshTokenRecord, Role, Session, User
from authsvc.domain.ports import Clock, Database, EventBus, PasswordHasher, RateLimiter, Transaction
from authsvc.domain.principal import SessionInfo
from authsvc.errors import (
    InvalidArgument,
    InvalidCredentials,
    MemberNotFound,
    PendingTokenInvalid,
    RateLimited,
    RefreshTokenReused,
    SessionExpired,
    SessionRevoked,
    SignupDisabled,
    TokenInvalid,
    UserNotFound,
)
from authsvc.security.jwt_tokens import AccessClaims, AccessTokenCodec, UnknownKeyId
from authsvc.security.refresh import MAX_LENGTH as REFRESH_MAX_LENGTH
from authsvc.security.refresh import RefreshTokens
from authsvc.security.secrets import sha256
from authsvc.services import validation
from authsvc.services.auth_cache import AuthCache
from authsvc.services.keys import KeyStore

log = structlog.get_logger("authsvc.auth")


class _Keep:
    """The session's active org stays as it is (a plain refresh)."""


KEEP_ORG = _Keep()

#: What a switch to a slug no org has resolves to: the nil UUID, which no org
#: has (their ids are random), so the switch then fails where a switch to an
#: org the user is not in fails, after the same statements.
_NO_ORG = uuid.UUID(int=0)

#: The longest pending token CompleteSignIn looks at. Far above any this
#: server will issue (like refresh tokens: a prefix and 43 characters), so an
#: oversized one is refused before any work, as an unknown one.
MAX_PENDING_TOKEN = 128


@dataclass(frozen=True, slots=True)
class AuthPolicy:
    access_ttl: timedelta
    session_ttl: timedelta
    reuse_grace: timedelta
    reuse_grace_count: int
    password_min_length: int
    password_max_length: int
    signup_enabled: bool
    signin_attempts_per_email: int
    signin_attempts_per_ip: int
    rate_limit_window: int


@dataclass(frozen=True, slots=True)
class IssuedTokens:
    access_token: str
    expires_at: datetime
    expires_in: int
    refresh_token: str
    session_id: uuid.UUID


@dataclass(frozen=True, slots=True)
class SignedIn:
    user: User
    tokens: IssuedTokens


def _new_user(email: str, display_name: str, role: Role, now: datetime) -> User:
    return User(
        id=uuid.uuid4(),
        email=email,
        display_name=display_name,
        role=role,
        email_verified=False,
        created_at=now,
        updated_at=now,
    )


class AuthService:
    def __init__(
        self,
        *,
        db: Database,
        hasher: PasswordHasher,
        keys: KeyStore,
        codec: AccessTokenCodec,
        refresh_tokens: RefreshTokens,
        cache: AuthCache,
        bus: EventBus,
        limiter: RateLimiter,
        clock: Clock,
        policy: AuthPolicy,
        metrics: Metrics | None = None,
    ) -> None:
        self._metrics: Metrics = metrics or NoMetrics()
        self._db = db
        self._hasher = hasher
        self._keys = keys
        self._codec = codec
        self._refresh = refresh_tokens
        self._cache = cache
        self._bus = bus
        self._limiter = limiter
        self._clock = clock
        self._policy = policy

    # -- sign-up and sign-in ---------------------------------------------------

    async def sign_up(
        self,
        *,
        email: str,
        password: str,
        display_name: str,
        client: ClientMeta,
        given_name: str = "",
        family_name: str = "",
    ) -> SignedIn:
        """Creates an account and its first session.

        Raises:
            SignupDisabled, InvalidArgument, WeakPassword, EmailAlreadyExists, RateLimited.
        """
        return await _counted(
            self._metrics.sign_up,
            self._sign_up(email, password, display_name, client, given_name, family_name),
        )

    async def _sign_up(
        self,
        email: str,
        password: str,
        display_name: str,
        client: ClientMeta,
        given_name: str,
        family_name: str,
    ) -> SignedIn:
        if not self._policy.signup_enabled:
            raise SignupDisabled()
        normalized, email_key = validation.email(email)
        p = self._policy
        validation.password(password, p.password_min_length, p.password_max_length)
        name = validation.profile_name(display_name, "display_name")
        given = validation.profile_name(given_name, "given_name")
        family = validation.profile_name(family_name, "family_name")
        await self._limit("ip", client.ip_address, p.signin_attempts_per_ip)
        password_hash = await self._hasher.hash(password)
        now = self._clock.now()
        user = replace(
            _new_user(normalized, name, Role.USER, now), given_name=given, family_name=family
        )
        async for attempt in self._db.attempts():
            async with attempt as tx:
                await tx.users.add(user, email_key, password_hash)
                tokens = await self._start_session(tx, user, client, now)
        log.info("user.signed_up", user_id=str(user.id), session_id=str(tokens.session_id))
        return SignedIn(user, tokens)

    async def sign_in_with_password(
        self,
        *,
        email: str,
        password: str,
        client: ClientMeta,
        given_name: str = "",
        family_name: str = "",
    ) -> SignedIn:
        """Starts a session for a correct email and password.

        An unknown email costs one Argon2 verify, like a wrong password, and
        fails with the same error. ``given_name`` and ``family_name`` fill in
        the user's names that are still empty (never one that is set), in the
        session's transaction, which writes the user only when there is a
        name to fill. They are checked before anything is looked up, so a bad
        one fails alike for every email.

        Raises:
            InvalidArgument, InvalidCredentials, RateLimited.
        """
        return await _counted(
            self._metrics.sign_in, self._sign_in(email, password, client, given_name, family_name)
        )

    async def _sign_in(
        self,
        email: str,
        password: str,
        client: ClientMeta,
        given_name: str,
        family_name: str,
    ) -> SignedIn:
        if not email:
            raise InvalidArgument.field("email", "required")
        if not password:
            raise InvalidArgument.field("password", "required")
        if len(password) > self._policy.password_max_length:
            raise InvalidArgument.field("password", "too long")
        email_key = validation.email_key(email)
        if email_key is None:
            raise InvalidArgument.field("email", "not a valid email address")
        names = {
            "given_name": validation.profile_name(given_name, "given_name"),
            "family_name": validation.profile_name(family_name, "family_name"),
        }
        p = self._policy
        await self._limit("ip", client.ip_address, p.signin_attempts_per_ip)
        await self._limit("email", sha256(email_key).hex()[:32], p.signin_attempts_per_email)
        async with self._db.reader() as reader:
            found = await reader.users.get_credentials(email_key)
        if found is None:
            await self._hasher.burn(password)
            raise InvalidCredentials()
        user, password_hash = found
        if not await self._hasher.verify(password_hash, password):
            raise InvalidCredentials()
        new_hash = None
        if self._hasher.needs_rehash(password_hash):
            new_hash = await self._hasher.hash(password)
        # Only names the user lacks (as read): most sign-ins fill nothing and
        # write no user row.
        fill = {k: v for k, v in names.items() if v and not getattr(user, k)}
        now = self._clock.now()
        try:
            async for attempt in self._db.attempts():
                async with attempt as tx:
                    if new_hash is not None:
                        await tx.users.set_password_hash(user.id, new_hash)
                    filled = await tx.users.fill_names(user.id, fill, now) if fill else None
                    tokens = await self._start_session(tx, filled or user, client, now)
        except UserNotFound:
            # Deleted since its password was checked: as if it never existed.
            raise InvalidCredentials() from None
        log.info("user.signed_in", user_id=str(user.id), session_id=str(tokens.session_id))
        return SignedIn(filled or user, tokens)

    async def _limit(self, kind: str, key: str, limit: int) -> None:
        """Counts an attempt against the ``kind`` limit (``ip``, ``email``)."""
        if limit <= 0:
            return
        retry_after = await self._limiter.hit(
            f"signin:{kind}:{key}", limit, self._policy.rate_limit_window
        )
        if retry_after is not None:
            self._metrics.rate_limited(kind)
            raise RateLimited(retry_after=retry_after)

    async def _start_session(
        self, tx: Transaction, user: User, client: ClientMeta, now: datetime
    ) -> IssuedTokens:
        session = Session(
            id=uuid.uuid4(),
            user_id=user.id,
            created_at=now,
            last_used_at=now,
            expires_at=now + self._policy.session_ttl,
            revoked_at=None,
            ip_address=client.ip_address,
            user_agent=client.user_agent,
        )
        await tx.sessions.add(session)
        refresh_token = self._refresh.new()
        await tx.refresh_tokens.add(session.id, sha256(refresh_token), 0, now)
        return self._tokens(session, user.role, None, refresh_token, now)

    def _tokens(
        self,
        session: Session,
        role: Role,
        org: tuple[OrgRole, str] | None,
        refresh_token: str,
        now: datetime,
    ) -> IssuedTokens:
        # An access token never outlives its session.
        expires_at = min(now + self._policy.access_ttl, session.expires_at)
        claims = AccessClaims(
            user_id=session.user_id,
            session_id=session.id,
            role=role,
            issued_at=now,
            expires_at=expires_at,
            org_id=session.org_id if org is not None else None,
            org_role=org[0] if org is not None else None,
            version=session.claims_version,
            org_slug=org[1] if org is not None else "",
        )
        access = self._codec.issue(self._keys.active, claims)
        return IssuedTokens(
            access_token=access,
            expires_at=expires_at,
            expires_in=int((expires_at - now).total_seconds()),
            refresh_token=refresh_token,
            session_id=session.id,
        )

    async def create_admin(self, *, email: str, password: str) -> tuple[User, bool]:
        """Creates an admin account, or makes an existing account admin.

        Returns the user and whether it was created. An existing account keeps
        its password.

        Raises:
            InvalidArgument, WeakPassword.
        """
        normalized, email_key = validation.email(email)
        p = self._policy
        validation.password(password, p.password_min_length, p.password_max_length)
        async with self._db.reader() as reader:
            found = await reader.users.get_credentials(email_key)
        now = self._clock.now()
        if found is not None:
            async for attempt in self._db.attempts():
                async with attempt as tx:
                    promoted = await tx.users.update(found[0].id, {"role": Role.ADMIN.value}, now)
                    assert promoted is not None
                    bumped = await tx.sessions.bump_claims([promoted.id], now)
                    await tx.events.add(*claims_changed([promoted.id], bumped))
            assert promoted is not None
            return promoted, False
        user = _new_user(normalized, "", Role.ADMIN, now)
        password_hash = await self._hasher.hash(password)
        async for attempt in self._db.attempts():
            async with attempt as tx:
                await tx.users.add(user, email_key, password_hash)
        return user, True

    # -- refresh rotation ------------------------------------------------------

    async def refresh(self, *, refresh_token: str, client: ClientMeta) -> IssuedTokens:
        """Exchanges a refresh token for a new pair (RFC 9700 rotation).

        Raises:
            TokenInvalid, SessionRevoked, SessionExpired, RefreshTokenReused.
        """
        return await self._rotate(refresh_token, client, KEEP_ORG)

    async def set_active_org(
        self, *, refresh_token: str, org_id: str, org_slug: str = "", client: ClientMeta
    ) -> IssuedTokens:
        """Switches (or, with an empty ``org_id`` and ``org_slug``, clears) the
        session's active org, rotating its refresh token as a refresh does.

        The org is named by its id or by its slug. An unknown org (id or
        slug) and an org the user is not in fail alike, with the same work
        (see ``_lock_org``), so neither says whether the org exists.

        Raises:
            InvalidArgument, TokenInvalid, SessionRevoked, SessionExpired,
            RefreshTokenReused, MemberNotFound.
        """
        target: uuid.UUID | str | None = None
        if org_id:
            target = validation.uuid_field(org_id, "org_id")
        elif org_slug:
            # A string that cannot be a slug names no org: bad input, said so.
            target = validation.slug(org_slug, "org_slug")
        return await self._rotate(refresh_token, client, target)

    async def complete_sign_in(self, *, pending_token: str, client: ClientMeta) -> SignedIn:
        """Completes a sign-in that answered a challenge.

        No sign-in answers a challenge yet, so no pending token is valid. The
        token is a credential: it is never logged nor put in an error.

        Raises:
            InvalidArgument, PendingTokenInvalid.
        """
        if not pending_token:
            raise InvalidArgument.field("pending_token", "required")
        if len(pending_token) > MAX_PENDING_TOKEN:
            # Refused unread: no token this long is ever issued.
            raise PendingTokenInvalid()
        raise PendingTokenInvalid()

    async def _rotate(
        self, refresh_token: str, client: ClientMeta, org: uuid.UUID | str | _Keep | None
    ) -> IssuedTokens:
        """Rotation, under a lock on the session row.

        Concurrent refreshes of one token are serialized: the first rotates,
        the rest see a rotated token and take the grace path, which returns the
        same successor (derived, not stored) instead of minting another one.
        The access token's org claims come from the session's active org and
        the user's live membership there, so they survive every refresh and
        follow every membership change. ``org`` is what a switch names (an id,
        or a slug resolved in this transaction), or KEEP_ORG for a refresh.
        """
        if not refresh_token or len(refresh_token) > REFRESH_MAX_LENGTH:
            raise TokenInvalid()
        token_hash = sha256(refresh_token)
        reused_session: uuid.UUID | None = None
        graced = False
        async for attempt in self._db.attempts():
            async with attempt as tx:
                switch_to = (
                    await self._lock_org(tx, org) if isinstance(org, uuid.UUID | str) else org
                )
                record = await tx.refresh_tokens.get_by_hash(token_hash)
                if record is None:
                    raise TokenInvalid()
                session = await tx.sessions.get(record.session_id, for_update=True)
                if session is None:
                    raise SessionRevoked()
                now = self._clock.now()
                if session.revoked_at is not None:
                    raise SessionRevoked()
                if session.expires_at <= now:
                    raise SessionExpired()
                # Re-read under the lock: another refresh may have rotated it.
                record = await tx.refresh_tokens.get_by_hash(token_hash)
                assert record is not None
                user = await tx.users.get(session.user_id)
                if user is None:
                    raise SessionRevoked()
                successor: str | None
                graced = record.rotated_at is not None
                if record.rotated_at is None:
                    successor = next_token = self._refresh.successor(refresh_token)
                    await tx.refresh_tokens.mark_rotated(record.id, now)
                    await tx.refresh_tokens.add(
                        session.id, sha256(next_token), record.generation + 1, now
                    )
                else:
                    successor = await self._grace_successor(tx, record, refresh_token, now)
                    if successor is not None:
                        await tx.refresh_tokens.count_grace_use(record.id)
                if successor is not None:
                    before = session
                    session, org_claim = await self._org_claims(tx, session, switch_to)
                    await tx.sessions.touch(session.id, now, client.ip_address, client.user_agent)
                    issued = self._tokens(session, user.role, org_claim, successor, now)
                    if session.claims_version != before.claims_version:
                        # The switch: the session's older tokens (and any
                        # cached view of them) must not keep acting in the
                        # old org.
                        await tx.events.add(
                            Event(
                                CLAIMS_CHANGED,
                                str(session.id),
                                session.claims_version,
                                time.time(),
                            )
                        )
                else:
                    # Reuse outside the grace interval: someone holds a token they
                    # should not. Revoke the whole family and commit that (leaving
                    # this block commits), then fail the call.
                    await tx.sessions.revoke(session.id, now, "refresh_token_reused")
                    await tx.events.add(*session_revoked(session.id))
                    reused_session = session.id
        if successor is not None:
            self._metrics.refresh("grace" if graced else "rotated")
            return issued
        self._metrics.refresh("reused")
        log.warning("session.refresh_token_reused", session_id=str(reused_session))
        raise RefreshTokenReused()

    async def _lock_org(self, tx: Transaction, org: uuid.UUID | str) -> uuid.UUID:
        """The id of the org a switch names, share-locked until the end of ``tx``.

        A switch reads the membership and then writes the session: the lock
        holds off a concurrent removal of that membership (which locks the org
        first too, so the lock order is the same), or the session could enter
        an org its user just left. A slug is resolved here, in the rotation's
        own transaction, and checked again once the lock is held: a rename
        (which locks the org for update) cannot move the slug to another org
        between the lookup and the switch.

        A slug no org has resolves to ``_NO_ORG`` through the very statements
        a known one takes; the membership lookup then fails it with
        MemberNotFound, as it fails an org the user is not in.
        """
        if isinstance(org, uuid.UUID):
            await tx.orgs.lock_shared(org)
            return org
        found = await tx.orgs.get_by_slug(org)
        target = found.id if found is not None else _NO_ORG
        await tx.orgs.lock_shared(target)
        locked = await tx.orgs.get(target)
        if locked is None or locked.slug != org:
            return _NO_ORG  # renamed or deleted meanwhile: the slug names no org now
        return target

    async def _org_claims(
        self, tx: Transaction, session: Session, org: uuid.UUID | _Keep | None
    ) -> tuple[Session, tuple[OrgRole, str] | None]:
        """The session with its active org switched as asked, and the user's
        live role in that org with the org's slug now.

        Raises: MemberNotFound (a switch to an org the user is not in, or
        that does not exist: the same answer, so existence does not leak).
        """
        if isinstance(org, _Keep):
            if session.org_id is None:
                return session, None
            claim = await tx.memberships.claim(session.org_id, session.user_id)
            if claim is None:
                # Membership removal clears the org in the same transaction;
                # this only guards against a row that escaped it.
                await tx.sessions.set_org(session.id, None)
                return replace(session, org_id=None), None
            return session, claim
        claim = None
        if org is not None:
            claim = await tx.memberships.claim(org, session.user_id)
            if claim is None:
                raise MemberNotFound()
        if org == session.org_id:
            return session, claim
        # A switch changes the claims: older tokens of the session become
        # stale, so no token acts in an org its session has left.
        await tx.sessions.set_org(session.id, org)
        version = await tx.sessions.bump_session_claims(session.id)
        return replace(session, org_id=org, claims_version=version), claim

    async def _grace_successor(
        self, tx: Transaction, record: RefreshTokenRecord, token: str, now: datetime
    ) -> str | None:
        """The session's current refresh token, if ``token`` may still get it.

        A rotated token may be exchanged again within ``reuse_grace`` of its
        rotation, at most ``reuse_grace_count`` times; the answer is the
        session's current token, walked forward from ``token`` by the
        successor function and checked against the stored hash.
        """
        assert record.rotated_at is not None
        if now - record.rotated_at > self._policy.reuse_grace:
            return None
        if record.grace_uses >= self._policy.reuse_grace_count:
            return None
        current = await tx.refresh_tokens.get_current(record.session_id)
        if current is None:
            return None
        candidate = token
        for _ in range(current.generation - record.generation):
            candidate = self._refresh.successor(candidate)
        if not hmac.compare_digest(sha256(candidate), current.token_hash):
            return None
        return candidate

    # -- sign-out and Authenticate --------------------------------------------

    async def sign_out(self, session: SessionInfo) -> None:
        """Revokes the caller's session; takes effect at once."""
        async for attempt in self._db.attempts():
            async with attempt as tx:
                if await tx.sessions.revoke(session.session_id, self._clock.now(), "signed_out"):
                    await tx.events.add(*session_revoked(session.session_id))
        log.info("session.signed_out", session_id=str(session.session_id))

    async def authenticate(self, access_token: str) -> SessionInfo:
        """Resolves an access token against the live session and user.

        Raises:
            TokenInvalid, TokenExpired, SessionRevoked, SessionExpired.
        """
        digest = sha256(access_token)
        if self._bus.healthy():
            hit = self._cache.get(digest)
            if hit is not None:
                self._metrics.authenticate_cache("hit")
                return hit
            self._metrics.authenticate_cache("miss")
        else:
            self._metrics.authenticate_cache("bypass")
        built_at = time.monotonic()
        claims = await self._verify(access_token)
        async with self._db.reader() as reader:
            found = await reader.sessions.get_with_user(claims.session_id)
        now = self._clock.now()
        if found is None or found[0].revoked_at is not None:
            # The database knows better than any cached view of this
            # session (one built while an event was missed): drop them.
            self._cache.mark(str(claims.session_id))
            raise SessionRevoked()
        session, user, org = found
        if session.user_id != claims.user_id:
            raise TokenInvalid()
        if session.expires_at <= now:
            self._cache.mark(str(session.id))
            raise SessionExpired()
        info = SessionInfo(
            session_id=session.id,
            user_id=user.id,
            email=user.email,
            role=user.role,
            # The live membership, not the token's claim: a removed member's
            # token no longer acts in the org, a re-roled one acts in the new role.
            org_id=session.org_id if org is not None else None,
            org_role=org[0] if org is not None else None,
            expires_at=claims.expires_at,
            session_expires_at=session.expires_at,
            org_slug=org[1] if org is not None else "",
            token_org_id=claims.org_id,
            token_org_role=claims.org_role,
            token_org_slug=claims.org_slug,
        )
        self._cache.put(digest, info, built_at, (claims.expires_at - now).total_seconds())
        return info

    async def _verify(self, token: str) -> AccessClaims:
        try:
            return self._codec.verify(token, self._keys.verification_keys)
        except UnknownKeyId as unknown:
            if not await self._keys.reload_for(unknown.kid):
                raise TokenInvalid() from None
        return self._codec.verify(token, self._keys.verification_keys)


async def _counted(count: Callable[[str], None], work: Awaitable[SignedIn]) -> SignedIn:
    """``work``'s result, its outcome (``success``, or its error's) counted."""
    try:
        signed = await work
    except Exception as error:
        count(outcome(error))
        raise
    count("success")
    return signed
