"""The task queue (huey). Tasks carry ids only; the inbox in the database holds the truth."""

from __future__ import annotations

import uuid
from typing import Any

from konstruct.config import Settings
from konstruct.db.urls import DatabaseURLs
from konstruct.errors import ConfigError, QueueError
from konstruct.inbox import OutboxTask
from konstruct.mail import Notice
from konstruct.startup import OnFirstUse, unimported

# huey.storage imports the redis client and psycopg whenever they are installed: ~90 ms of every CLI command that
# queues (`chat` among them), which uses neither when the queue is the database (its task is a row of the inbox's own
# transaction). Only a Redis queue needs redis, and make_queue hands it to huey then (_redis_for_huey); huey's
# Postgres storage gets psycopg as it first connects (startup.OnFirstUse).
with unimported("redis"), unimported("psycopg"):
    from huey import Huey, PostgresHuey, RedisHuey, SqliteHuey, crontab
    from huey import storage as huey_storage
    from huey.storage import PostgresStorage
if huey_storage.psycopg is None:
    huey_storage.psycopg = OnFirstUse("psycopg")

# Set in the worker process by konstruct.worker.main; tasks hand their ids to it.
_worker: Any = None


def set_worker(worker: Any) -> None:
    global _worker
    _worker = worker


def _current_worker() -> Any:
    if _worker is None:
        raise RuntimeError("a Konstruct task ran outside `konstruct worker`")
    return _worker


REVOKE_FLAG = "r:"  # huey's key of a task's revocation flag: "r:" and the task id


class _Unrevoked:
    """Konstruct's huey: no task is ever revoked (the inbox row is the truth; a message not to answer is settled there),
    so huey's revocation flags are neither looked up before each task nor deleted after it. Those were two of the three
    round trips to the queue's storage per task (the third takes the task). Revoking is refused, so that nothing can
    count on a check that no longer runs."""

    def is_revoked(self, task: Any, timestamp: Any = None, peek: bool = True) -> bool:
        return False

    def delete(self, key: str) -> Any:
        if key.startswith(REVOKE_FLAG):  # huey deletes the task's flag after each task: there is none
            return False
        return super().delete(key)  # type: ignore[misc]

    def revoke(self, *args: Any, **kwargs: Any) -> None:
        raise QueueError("Konstruct's queue does not revoke tasks: settle the message in the inbox instead")

    revoke_all = revoke_by_id = revoke


class _PostgresHuey(_Unrevoked, PostgresHuey):
    """huey's Postgres storage (the default, in Konstruct's own database), without revocations."""


class _SqliteHuey(_Unrevoked, SqliteHuey):
    """huey's SQLite storage (queue.url 'sqlite:///path'), without revocations."""


class _RedisHuey(_Unrevoked, RedisHuey):
    """huey's Redis storage (queue.url 'redis://…', for scale-out), without revocations."""


class Queue:
    """A huey instance with Konstruct's tasks registered on it."""

    def __init__(self, huey: Huey) -> None:
        self.huey = huey

        @huey.task(name="process_message")
        def process_message(tenant_id: str, inbound_id: str) -> None:
            _current_worker().admit(uuid.UUID(tenant_id), uuid.UUID(inbound_id))

        @huey.task(name="process_suspect")
        def process_suspect(tenant_id: str, inbound_id: str) -> None:
            # In flight when a worker died: answered alone, so that only the message that kills a worker pays for it.
            _current_worker().admit(uuid.UUID(tenant_id), uuid.UUID(inbound_id), suspect=True)

        @huey.periodic_task(crontab(minute="*"), name="sweep_stuck_messages")
        def sweep_stuck_messages() -> None:
            _current_worker().sweep()

        @huey.task(name="remember_message", retries=2, retry_delay=5)
        def remember_message(tenant_id: str, inbound_id: str) -> None:
            _current_worker().remember(uuid.UUID(tenant_id), uuid.UUID(inbound_id))

        @huey.task(name="notify_admins", retries=5, retry_delay=30)
        def notify_admins(tenant_id: str, kind: str, subject: str, body: str) -> None:
            _current_worker().notify_admins(uuid.UUID(tenant_id), kind, subject, body)

        @huey.task(name="send_invitation", retries=5, retry_delay=30)
        def send_invitation(tenant_id: str, invitation_id: str, sealed_token: str) -> None:
            _current_worker().send_invitation(uuid.UUID(tenant_id), uuid.UUID(invitation_id), sealed_token)

        @huey.task(name="ingest_knowledge")
        def ingest_knowledge(tenant_id: str, job_id: str) -> None:
            _current_worker().ingest_knowledge(uuid.UUID(tenant_id), uuid.UUID(job_id))

        self._ingest_knowledge: Any = ingest_knowledge
        self._notify_admins: Any = notify_admins
        self._send_invitation: Any = send_invitation
        self._process_message: Any = process_message  # a huey TaskWrapper
        self._process_suspect: Any = process_suspect
        self._remember_message: Any = remember_message

    def enqueue_memory(self, tenant_id: uuid.UUID, inbound_id: uuid.UUID) -> None:
        """Fire and forget: embed what the person said in this message and keep it as a memory."""
        self._remember_message(str(tenant_id), str(inbound_id))

    def enqueue_knowledge(self, tenant_id: uuid.UUID, job_id: uuid.UUID) -> None:
        """Ring for a knowledge job (its request is in knowledge_jobs; the task carries ids only)."""
        try:
            self._ingest_knowledge(str(tenant_id), str(job_id))
        except Exception as exc:
            raise QueueError(f"cannot queue the knowledge job: {type(exc).__name__}: {exc}") from None

    def enqueue_notice(self, notice: Notice) -> None:
        """Email the tenant's admins about something (a budget alert) from a worker, with retries."""
        self._notify_admins(str(notice.tenant_id), notice.kind, notice.subject, notice.body)

    def enqueue_invitation(self, tenant_id: uuid.UUID, invitation_id: uuid.UUID, sealed_token: str) -> None:
        """Email an invitation from a worker. The token travels encrypted with the master key (the queue is storage too)."""
        try:
            self._send_invitation(str(tenant_id), str(invitation_id), sealed_token)
        except Exception as exc:
            raise QueueError(f"cannot queue the invitation email: {type(exc).__name__}: {exc}") from None

    def enqueue(self, tenant_id: uuid.UUID, inbound_id: uuid.UUID, *, suspect: bool = False) -> None:
        """Ring the doorbell for one stored inbound message (on the suspect lane: answered alone)."""
        task = self._process_suspect if suspect else self._process_message
        try:
            task(str(tenant_id), str(inbound_id))
        except Exception as exc:
            raise QueueError(f"cannot queue a message: {type(exc).__name__}: {exc}") from None

    @property
    def tracked(self) -> bool:
        """Whether queue entries are rows in Konstruct's database (huey's Postgres storage), so the inbox can see them."""
        return isinstance(self.huey.storage, PostgresStorage)

    def outbox(self, tenant_id: uuid.UUID, inbound_id: uuid.UUID, *, suspect: bool = False) -> OutboxTask | None:
        """The queue entry as a row for the inbox's own transaction, when the queue is huey's Postgres storage."""
        storage = self.huey.storage
        if not isinstance(storage, PostgresStorage):
            return None
        task = (self._process_suspect if suspect else self._process_message).s(str(tenant_id), str(inbound_id))
        return OutboxTask(table=storage.table_task, queue=storage.name, data=self.huey.serialize_task(task), notify_channel=storage.channel)

    def pending(self) -> int:
        try:
            return int(self.huey.pending_count())
        except Exception as exc:
            raise QueueError(f"cannot reach the queue: {type(exc).__name__}: {exc}") from None

    def close(self) -> None:
        storage = self.huey.storage
        if hasattr(storage, "close"):
            storage.close()


def _redis_for_huey() -> None:
    """Give huey.storage the redis client its import went without (above): the names its Redis storage uses, bound
    as its own `from redis import ...` would have bound them. Once is enough; huey imported elsewhere first has them."""
    if huey_storage.Redis is not None:
        return
    import redis
    from redis.exceptions import ConnectionError, TimeoutError

    huey_storage.ConnectionPool, huey_storage.Redis = redis.ConnectionPool, redis.Redis
    huey_storage.ConnectionError, huey_storage.TimeoutError = ConnectionError, TimeoutError
    huey_storage.RedisStorage.redis_client = redis.Redis


def make_queue(settings: Settings, urls: DatabaseURLs) -> Queue:
    """The embedded default is huey's Postgres storage in Konstruct's own database (LISTEN/NOTIFY wake-ups)."""
    url = settings.queue.url or ""
    name = settings.queue.name
    if not url or url in ("postgres", "postgresql", "database"):
        huey: Huey = _PostgresHuey(name, dsn=urls.app_libpq(), create_tables=False, blocking=True, read_timeout=1)
    elif url.startswith("sqlite:///"):
        huey = _SqliteHuey(name, filename=url.removeprefix("sqlite:///"))
    elif url.startswith(("redis://", "rediss://", "unix://")):
        _redis_for_huey()
        huey = _RedisHuey(name, url=url, blocking=True)
    else:
        raise ConfigError(f"queue.url: {url!r} is not supported; use empty (the database), 'sqlite:///path' or 'redis://host:6379/0'")
    return Queue(huey)
