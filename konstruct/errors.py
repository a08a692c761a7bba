"""One error hierarchy. Each error's message says what went wrong and what to do."""

from __future__ import annotations


class KonstructError(Exception):
    """Base for every error meant to reach a person as a one-line message."""

    exit_code = 1
    http_status = 400


class ConfigError(KonstructError):
    """The configuration file or environment is missing or invalid."""


class NotFoundError(KonstructError):
    """A named thing (tenant, agent, message) does not exist."""

    http_status = 404


class ConflictError(KonstructError):
    """The thing to create exists already, or the state forbids the change."""

    http_status = 409


class ValidationError(KonstructError):
    """Input from a person or a request is malformed."""

    http_status = 422


class DatabaseError(KonstructError):
    """The database is unreachable, lacks pgvector, or is not migrated."""

    http_status = 503


class DatabaseUnavailable(DatabaseError):
    """The database cannot be reached right now (down, restarting, in recovery): try again shortly.

    Webhooks answer 503 with it, so Slack and Meta deliver again; workers wait and carry on."""

    http_status = 503


class QueueError(KonstructError):
    """The task queue cannot be reached."""

    http_status = 503


class TenantNotSetError(KonstructError):
    """Tenant data was touched outside a tenant-scoped session: always a bug."""

    http_status = 500


class WorkerUnavailableError(KonstructError):
    """No worker answered in time."""

    http_status = 503


class PermissionDenied(KonstructError):
    """The acting user's role does not allow the operation (or the tenant is not theirs)."""

    exit_code = 3
    http_status = 403
