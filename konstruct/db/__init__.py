"""Database access: the embedded server, engines, tenant-scoped sessions, models."""
