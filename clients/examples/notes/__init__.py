"""Notes per organization: a tenant-scoped gRPC service behind the authsvc sidecar.

See README.md in this folder. ``service`` holds the store, the servicer and
``build_server``; ``python -m examples.notes`` runs it.
"""
