"""Names shared by the benchmark's processes."""

from __future__ import annotations

import os
import threading

ECHO_SERVICE = "bench.Echo"
ECHO_METHOD = f"/{ECHO_SERVICE}/Echo"

# The orchestrator hands each child the read end of a pipe (its "lifeline");
# the child exits when the pipe reaches EOF, i.e. when the orchestrator is
# gone, however it died.
LIFELINE_FD_ENV = "AUTHSVC_BENCH_LIFELINE_FD"
INFRA_OUT_ENV = "AUTHSVC_BENCH_INFRA_OUT"

# Argon2 as the server uses it by default (OWASP: m=19456 KiB, t=2, p=1).
ARGON2_TIME_COST = 2
ARGON2_MEMORY_KIB = 19456
ARGON2_PARALLELISM = 1


def wait_for_eof(fd: int) -> None:
    """Blocks until ``fd`` reaches EOF (or fails)."""
    while True:
        try:
            if not os.read(fd, 4096):
                return
        except InterruptedError:
            continue
        except OSError:
            return


def exit_on_eof(fd: int, code: int = 3) -> None:
    """Ends this process as soon as ``fd`` reaches EOF (a daemon thread watches it)."""

    def watch() -> None:
        wait_for_eof(fd)
        os._exit(code)

    threading.Thread(target=watch, name="bench-lifeline", daemon=True).start()
