"""Generated authsvc.v1 messages and stubs."""
