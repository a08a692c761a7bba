"""Killing parts of a running `konstruct up` while Slack events and terminal chats stream in, and counting what
came out: shared by tests/test_crash_safety.py (small, in CI) and bench/chaos.py (large, prints figures).

Everything is real: `up` on its own embedded PostgreSQL, its gateway, worker and standby; Slack events signed as
Slack signs them and delivered again as Slack does when they get no 200; the fake Slack Web API and fake LLM on
loopback. The driver SIGKILLs the active worker and the embedded PostgreSQL's postmaster.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg

from konstruct.config import load_settings
from konstruct.db.embedded import postmaster_pid
from konstruct.supervision import read_state
from tests.conftest import write_config
from tests.fakes.llm import FakeLLM
from tests.fakes.slack import FakeSlack, sign
from tests.helpers import Proc, cli_env, konstruct, wait_for

TEAM = "T00CHAOS01"
BOT_USER = "U00CHAOSBT"
BOT_TOKEN = "xoxb-chaos-token-0001"
SIGNING_SECRET = "chaos-signing-secret"
CHANNELS = [f"C00CHAOS{n:02d}" for n in range(32)]  # Slack paces posts per channel (about one a second): spread the load


@dataclass
class Delivery:
    """One Slack event and what became of its deliveries."""

    event_id: str
    ts: str
    text: str
    channel: str
    statuses: list[int | str] = field(default_factory=list)  # each delivery: HTTP status or the transport error's name
    acked: bool = False


@dataclass
class Chat:
    message_id: str
    text: str
    outcome: str = ""


@dataclass
class Report:
    events_sent: int
    events_acked: int
    chats_sent: int
    answered_once: int
    unanswered: list[str]
    answered_twice: list[str]
    stray_placeholders: int
    failed_rows: int
    chats_answered_late: int  # answered once, but after `konstruct chat` had stopped waiting (its timeout)
    worker_kills: int
    database_kills: int
    recoveries: list[float]  # seconds from each database kill until a new message was answered
    up_alive: bool

    def lines(self) -> list[str]:
        longest = max(self.recoveries, default=0.0)
        return [
            f"events sent {self.events_sent} (acked {self.events_acked}), terminal chats {self.chats_sent}",
            f"worker kills {self.worker_kills}, database kills {self.database_kills}",
            f"answered once {self.answered_once}, unanswered {len(self.unanswered)}, answered twice {len(self.answered_twice)}",
            f"stray placeholders {self.stray_placeholders}, failed messages {self.failed_rows}, "
            f"chats answered after their client stopped waiting {self.chats_answered_late}",
            f"longest recovery after a database kill {longest:.1f}s ({', '.join(f'{r:.1f}' for r in self.recoveries) or 'none'})",
            f"up still running with all its parts: {self.up_alive}",
        ]


class Chaos:
    """An `up` under fire. Use as a context manager; `stop()` ends `up` (and checks it leaves nothing behind)."""

    def __init__(self, root: Path, llm: FakeLLM, slack: FakeSlack, *, retry_after: tuple[float, ...] = (0.5, 3.0, 10.0)) -> None:
        self.root, self.llm, self.slack = root, llm, slack
        self.retry_after = retry_after  # Slack: at once, after about a minute, after about five (scaled down)
        self.config = write_config(
            root,
            None,  # an embedded PostgreSQL of its own: the driver kills it
            llm.url,
            slack={"api_url": slack.url},
            worker={"heartbeat_interval": 0.5, "stale_after": 10, "received_grace": 30},  # max_attempts: the default, 5
            up={"stable_after": 1.0, "max_backoff": 5.0},
        )
        self.settings = load_settings(self.config)
        self.base = f"http://127.0.0.1:{self.settings.gateway.port}"
        self.deliveries: list[Delivery] = []
        self.chats: list[Chat] = []
        self.worker_kills = 0
        self._killed: set[int] = set()
        self.database_kills: list[float] = []
        self._lock = threading.Lock()
        self.up: Proc | None = None

    # -- set-up --

    def start(self) -> Chaos:
        self.up = Proc("up", ["up"], config=self.config, log_dir=self.root)
        self.up.wait_for_log("Konstruct is up", timeout=120)
        env = cli_env(CHAOS_BOT=BOT_TOKEN, CHAOS_SIGNING=SIGNING_SECRET)
        for args in (
            ("tenant", "create", "Chaos Inc", "--slug", "chaos"),
            ("agent", "create", "--tenant", "chaos", "--name", "Cy", "--role", "Support", "--persona", "Brief."),
            ("channel", "connect", "slack", "--tenant", "chaos", "--bot-token-env", "CHAOS_BOT", "--signing-secret-env", "CHAOS_SIGNING"),
        ):
            done = konstruct(*args, config=self.config, env=env)
            assert done.returncode == 0, f"{args}: {done.stderr}\n{self.up.log()}"
        wait_for(lambda: (self.state() or {}).get("parts", {}).get("standby", {}).get("state") == "running", 60, "a warm standby")
        return self

    def __enter__(self) -> Chaos:
        self.slack.add_token(BOT_TOKEN, team_id=TEAM, team="Chaos HQ", user_id=BOT_USER)
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.up is not None and self.up.process.poll() is None:
            with contextlib.suppress(AssertionError):  # did not stop in time: killed, and its parts die with it
                self.up.stop(signal.SIGINT, timeout=60)
        pid = postmaster_pid(self.settings.data_dir)
        if pid is not None:  # a failed run must not leave a server behind either
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def state(self) -> dict[str, Any] | None:
        return read_state(self.settings.data_dir)

    # -- load --

    def send_event(self, n: int) -> Delivery:
        ts = f"{time.time():.6f}"
        delivery = Delivery(f"Ev{uuid.uuid4().hex[:12].upper()}", ts, f"question {n} {uuid.uuid4().hex[:6]}", CHANNELS[n % len(CHANNELS)])
        with self._lock:
            self.deliveries.append(delivery)
        event = {
            "type": "app_mention",
            "user": "U00PERSON1",
            "text": f"<@{BOT_USER}> {delivery.text}",
            "ts": ts,
            "channel": delivery.channel,
        }
        payload = {"team_id": TEAM, "api_app_id": "A00CHAOS", "type": "event_callback", "event_id": delivery.event_id,
                   "event_time": int(time.time()), "event": event}  # fmt: skip
        body = json.dumps(payload).encode()
        for attempt, wait in enumerate((0.0, *self.retry_after)):
            time.sleep(wait)
            headers = sign(body, SIGNING_SECRET)
            if attempt:
                headers.update({"X-Slack-Retry-Num": str(attempt), "X-Slack-Retry-Reason": "http_error"})
            try:
                status: int | str = httpx.post(f"{self.base}/slack/events", content=body, headers=headers, timeout=3).status_code
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            delivery.statuses.append(status)
            if status == 200:
                delivery.acked = True
                break
        return delivery

    def send_chat(self, n: int) -> Chat:
        chat = Chat(f"chat-{n}-{uuid.uuid4().hex[:8]}", f"terminal question {n}")
        with self._lock:
            self.chats.append(chat)
        for _ in range(8):  # the same message id each time: a stored message is not stored twice
            done = konstruct("chat", "-t", "chaos", "-a", "Cy", "-m", chat.text, "--message-id", chat.message_id, "--json",
                             config=self.config, timeout=90)  # fmt: skip
            if done.returncode == 0:
                chat.outcome = json.loads(done.stdout)["status"]
                return chat
            chat.outcome = (done.stderr or done.stdout).strip().splitlines()[-1:][0] if (done.stderr or done.stdout).strip() else "?"
            time.sleep(1.0)
        return chat

    # -- violence --

    def worker_pid(self) -> int | None:
        """The running worker's pid, once it has run `up.stable_after` (a quicker kill is a crash loop, which `up`
        rightly answers with a growing pause)."""
        worker = ((self.state() or {}).get("parts") or {}).get("worker") or {}
        if worker.get("state") != "running" or (worker.get("running_for") or 0) < self.settings.up.stable_after:
            return None
        return worker.get("pid")

    def kill_worker(self) -> bool:
        pid = self.worker_pid()
        if pid is None or pid in self._killed:  # `up` has not noticed the last kill yet
            return False
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            self._killed.add(pid)
            self.worker_kills += 1
            return True
        return False

    def kill_database(self) -> bool:
        pid = postmaster_pid(self.settings.data_dir)
        if pid is None:
            return False
        os.kill(pid, signal.SIGKILL)
        self.database_kills.append(time.time())
        return True

    def run(
        self,
        *,
        events: int,
        rate: float,
        chats: int,
        worker_kills: int,
        database_kills: int,
        on_tick: Callable[[str], None] | None = None,
    ) -> None:
        """Send `events` Slack events at `rate` per second and `chats` terminal chats spread over the same time,
        killing the worker `worker_kills` times and the database `database_kills` times at even intervals."""
        duration = events / rate
        kills = sorted([("worker", duration * (i + 0.5) / worker_kills) for i in range(worker_kills)]
                       + [("database", duration * (i + 0.4) / database_kills) for i in range(database_kills)],
                       key=lambda k: k[1])  # fmt: skip
        chat_times = [duration * (i + 0.5) / chats for i in range(chats)] if chats else []
        started = time.monotonic()
        with ThreadPoolExecutor(max_workers=64) as pool:
            futures: list[Future[Any]] = []
            sent_events = sent_chats = 0
            while sent_events < events or kills or sent_chats < len(chat_times):
                now = time.monotonic() - started
                while sent_events < events and now >= sent_events / rate:
                    futures.append(pool.submit(self.send_event, sent_events))
                    sent_events += 1
                while sent_chats < len(chat_times) and now >= chat_times[sent_chats]:
                    futures.append(pool.submit(self.send_chat, sent_chats))
                    sent_chats += 1
                while kills and now >= kills[0][1]:
                    what, _ = kills.pop(0)
                    if what == "worker":
                        # Only a worker that is running can be killed; wait for the next one if it is restarting.
                        if not self.kill_worker():
                            kills.insert(0, (what, now + 0.2))
                            break
                    elif not self.kill_database():
                        kills.insert(0, (what, now + 0.2))
                        break
                    if on_tick:
                        on_tick(f"{now:6.1f}s killed the {what} (events sent {sent_events}, chats {sent_chats})")
                time.sleep(0.01)
            for future in futures:
                future.result()

    # -- the count --

    def bot_messages(self) -> dict[tuple[str, str], list[dict[str, Any]]]:
        """The bot's messages in each event's thread (by channel and event ts)."""
        with self.slack._lock:
            messages = [(channel, dict(m)) for (channel, _), m in self.slack.messages.items() if m.get("bot_id")]
        threads: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for channel, message in messages:
            threads.setdefault((channel, str(message.get("thread_ts"))), []).append(message)
        return threads

    def settled(self) -> bool:
        threads = self.bot_messages()
        placeholder = self.settings.slack.placeholder
        for delivery in self.deliveries:
            if not delivery.acked:
                continue
            replies = threads.get((delivery.channel, delivery.ts), [])
            # The answer itself, not any bot message: a streamed answer is in the thread before its text is complete
            # (the chaos test once counted a reply still streaming as unanswered).
            if not any(delivery.text in (m.get("text") or "") for m in replies) or any(m.get("text") == placeholder for m in replies):
                return False
        return all(c.outcome for c in self.chats)

    def report(self, settle: float = 120) -> Report:
        with contextlib.suppress(AssertionError):
            wait_for(self.settled, settle, "every message answered", interval=0.25)
        threads = self.bot_messages()
        placeholder = self.settings.slack.placeholder
        once, unanswered, twice, strays = 0, [], [], 0
        for delivery in self.deliveries:
            replies = threads.get((delivery.channel, delivery.ts), [])
            strays += sum(1 for m in replies if m.get("text") == placeholder)
            answers = [m for m in replies if delivery.text in (m.get("text") or "")]
            if len(answers) == 1:
                once += 1
            elif not answers:
                unanswered.append(f"event {delivery.event_id} ({delivery.statuses})")
            else:
                twice.append(f"event {delivery.event_id}: {len(answers)} answers")
        replies_per_chat = self._terminal_replies()
        late = 0
        for chat in self.chats:
            count = replies_per_chat.get(chat.message_id, 0)
            if count == 1:
                once += 1
                late += chat.outcome != "replied"  # answered after the person's `konstruct chat` stopped waiting
            elif count == 0:
                unanswered.append(f"chat {chat.message_id} ({chat.outcome!r})")
            else:
                twice.append(f"chat {chat.message_id}: {count} replies")
        return Report(
            events_sent=len(self.deliveries),
            events_acked=sum(1 for d in self.deliveries if d.acked),
            chats_sent=len(self.chats),
            answered_once=once,
            unanswered=unanswered,
            answered_twice=twice,
            stray_placeholders=strays,
            failed_rows=self._failed_rows(),
            chats_answered_late=late,
            worker_kills=self.worker_kills,
            database_kills=len(self.database_kills),
            recoveries=self._recoveries(),
            up_alive=self._up_alive(),
        )

    def _sql(self, query: str) -> list[tuple[Any, ...]]:
        """Rows from the embedded database as its owner, over the server's socket."""
        with psycopg.connect(read_owner_url(self.settings.data_dir), autocommit=True) as conn:
            return list(conn.execute(query).fetchall())

    def _terminal_replies(self) -> dict[str, int]:
        rows = self._sql(
            "select i.external_id, count(m.id) from inbound_messages i left join messages m "
            "on m.inbound_id = i.id and m.direction = 'out' where i.channel = 'terminal' group by i.external_id"
        )
        return {external_id: int(count) for external_id, count in rows}

    def _failed_rows(self) -> int:
        return int(self._sql("select count(*) from inbound_messages where status = 'failed'")[0][0])

    def _recoveries(self) -> list[float]:
        """For each database kill: seconds until the first reply written after it (a message answered again)."""
        out = []
        for killed in self.database_kills:
            rows = self._sql(
                f"select extract(epoch from min(created_at)) from messages where direction = 'out' and created_at > to_timestamp({killed})"
            )
            if rows and rows[0][0]:
                out.append(float(rows[0][0]) - killed)
        return out

    def _up_alive(self, within: float = 30.0) -> bool:
        """up still runs, and every part is back: a part killed last may be restarting when the report is made,
        so this waits for them (up to `within` seconds) rather than sampling one instant."""

        def whole() -> bool:
            parts = (self.state() or {}).get("parts") or {}
            running = all(parts.get(name, {}).get("pid") for name in ("gateway", "worker"))
            return running and postmaster_pid(self.settings.data_dir) is not None

        deadline = time.monotonic() + within
        while self.up is not None and self.up.process.poll() is None:
            if whole():
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        return False


def read_owner_url(data_dir: Path) -> str:
    """The embedded server's superuser URL (its socket), for looking at the database from outside."""
    lines = (data_dir / "pg" / "postmaster.pid").read_text().splitlines()
    return f"postgresql://postgres@/konstruct?host={lines[4]}&port={lines[3]}"
