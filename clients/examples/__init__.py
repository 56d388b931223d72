"""Examples of services that use ``authsvc_client`` (importable as ``examples.*``
with ``clients/`` on the path)."""
