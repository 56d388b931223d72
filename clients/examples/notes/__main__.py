"""``python -m examples.notes``: the notes service behind the authsvc sidecar.

Run from ``clients/`` (or with it on ``PYTHONPATH``); see README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys

from .service import serve


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.notes", description=__doc__)
    parser.add_argument("--authsvc", default="127.0.0.1:50051", help="authsvc's host:port")
    parser.add_argument("--listen", default="127.0.0.1:50061", help="where to serve notes")
    parser.add_argument(
        "--mode",
        choices=["watch", "online"],
        default="watch",
        help="revocations pushed by authsvc (watch, needs AUTHSVC_API_KEY) or an "
        "Authenticate per token, cached (online)",
    )
    parser.add_argument("--online-cache-ttl", type=float, default=2.0)
    args = parser.parse_args(argv)
    api_key = os.environ.get("AUTHSVC_API_KEY")
    if args.mode == "watch" and not api_key:
        parser.error("watch mode needs an authsvc API key in AUTHSVC_API_KEY")

    def ready(port: int) -> None:
        print(f"notes: serving on port {port} ({args.mode} mode)", flush=True)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(
            serve(
                args.authsvc,
                api_key=api_key,
                listen=args.listen,
                mode=args.mode,
                online_cache_ttl=args.online_cache_ttl,
                ready=ready,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
