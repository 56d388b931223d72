"""The ``authsvc`` command."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import hashlib
import os
import secrets
import sys

from pydantic import ValidationError

from authsvc import logs, tracing
from authsvc.config import Settings
from authsvc.errors import AuthError
from authsvc.storage.migrate import NotMigrated


def _serve(settings: Settings, _args: argparse.Namespace) -> int:
    from authsvc.app import MetricsListenError, serve

    try:
        asyncio.run(serve(settings))
    except MetricsListenError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


def _migrate(settings: Settings, args: argparse.Namespace) -> int:
    from authsvc.storage import migrate

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    migrate.upgrade(settings.resolved_database_url(), args.revision)
    print(f"database migrated to {args.revision}")
    return 0


def _rotate(settings: Settings, _args: argparse.Namespace) -> int:
    from authsvc.app import build_core

    async def run() -> str:
        core = await build_core(settings, create_keys=False)
        try:
            return await core.keys.rotate()
        finally:
            await core.close()

    kid = asyncio.run(run())
    print(
        f"new signing key {kid} is active; running servers pick it up within "
        f"{settings.key_reload_interval:g}s"
    )
    return 0


def _create_admin(settings: Settings, args: argparse.Namespace) -> int:
    from authsvc.app import build_core

    password = os.environ.get("AUTHSVC_ADMIN_PASSWORD")
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    if password is None:
        password = getpass.getpass("password: ")

    async def run() -> tuple[str, bool]:
        core = await build_core(settings)
        try:
            user, created = await core.auth.create_admin(email=args.email, password=password)
            return str(user.id), created
        finally:
            await core.close()

    try:
        user_id, created = asyncio.run(run())
    except AuthError as error:
        print(f"error: {error.message}", file=sys.stderr)
        return 1
    print(f"{'created admin' if created else 'made admin'} {args.email} ({user_id})")
    return 0


def _new_api_key(_settings: Settings, args: argparse.Namespace) -> int:
    key = "ak_" + secrets.token_urlsafe(32)
    digest = hashlib.sha256(key.encode()).hexdigest()
    print(f"API key (give it to the service, shown once): {key}")
    print(f"add to AUTHSVC_API_KEYS (comma-separated): {args.name}:{digest}")
    return 0


def _health(settings: Settings, args: argparse.Namespace) -> int:
    """Exit 0 when the server answers SERVING (the Docker HEALTHCHECK)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    target = args.target or settings.listen
    if settings.tls_cert_file is not None:
        ca = settings.tls_cert_file.read_bytes()
        channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(ca))
    else:
        channel = grpc.insecure_channel(target)
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=args.timeout
            )
        except grpc.RpcError as error:
            print(f"unhealthy: {error.code().name}", file=sys.stderr)
            return 1
    serving = reply.status == health_pb2.HealthCheckResponse.SERVING
    print("serving" if serving else "not serving")
    return 0 if serving else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="authsvc", description="gRPC authentication service")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="run the gRPC server").set_defaults(run=_serve)
    migrate = commands.add_parser("migrate", help="apply database migrations")
    migrate.add_argument("--revision", default="head")
    migrate.set_defaults(run=_migrate)
    keys = commands.add_parser("keys", help="signing keys")
    keys_commands = keys.add_subparsers(dest="keys_command", required=True)
    keys_commands.add_parser("rotate", help="make a new active signing key").set_defaults(
        run=_rotate
    )
    admin = commands.add_parser("create-admin", help="create an admin (or promote a user)")
    admin.add_argument("--email", required=True)
    admin.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the password from stdin (else AUTHSVC_ADMIN_PASSWORD, else a prompt)",
    )
    admin.set_defaults(run=_create_admin)
    api_key = commands.add_parser("api-key", help="service API keys")
    api_key_commands = api_key.add_subparsers(dest="api_key_command", required=True)
    new = api_key_commands.add_parser("new", help="generate a key and its AUTHSVC_API_KEYS entry")
    new.add_argument("name")
    new.set_defaults(run=_new_api_key)
    health = commands.add_parser("health", help="check a running server's health service")
    health.add_argument("--target", help="host:port (default: AUTHSVC_LISTEN)")
    health.add_argument("--timeout", type=float, default=3.0)
    health.set_defaults(run=_health)
    args = parser.parse_args(argv)
    try:
        settings = Settings()
    except ValidationError as error:
        print(f"invalid settings: {error}", file=sys.stderr)
        return 2
    # A trace id on each line written in an RPC's span, when traces are on.
    logs.configure(settings.log_format, settings.log_level, trace_ids=tracing.enabled(os.environ))
    try:
        return int(args.run(settings, args))
    except NotMigrated as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
