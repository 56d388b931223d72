"""Python client for authsvc: generated stubs (``authsvc_client.v1``) and helpers."""
