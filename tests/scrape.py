"""Reading Prometheus metrics the way Prometheus does: over HTTP, in the text
format, parsed by prometheus-client's own parser.

Shared by the metrics tests, the replicas' and the sidecar's, and the fault
tests that scrape while a backend is down.
"""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

#: (sample name, its labels) -> value.
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def get(port: int, path: str = "/metrics", timeout: float = 10) -> str:
    """One scrape of ``http://127.0.0.1:port/metrics``: a 200 in the text format."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        return str(response.read().decode())


def parse(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def rpc(
    method: str, service: str = "authsvc.v1.AuthService", kind: str = "unary"
) -> dict[str, str]:
    """The labels of a method's grpc_server_* series."""
    return {"grpc_service": service, "grpc_method": method, "grpc_type": kind}
