"""`konstruct chat` as a person at a terminal uses it: a real process in a pseudo-terminal, a real worker and the fake LLM.

Keys are typed into the terminal as a keyboard sends them (an arrow key is "\\x1b[D", Ctrl-C is "\\x03", which the
terminal turns into SIGINT for the process); what the process prints is read as it comes, waiting for what is expected.
"""

from __future__ import annotations

import fcntl
import os
import re
import select
import stat
import struct
import subprocess
import sys
import termios
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import select as sql_select
from sqlalchemy.engine import URL

from konstruct.agent.agents import create_agent
from konstruct.cli.chat import HISTORY_FILE
from konstruct.config import Settings, load_settings
from konstruct.db.engine import Database
from konstruct.db.models import Message
from konstruct.tenancy.tenants import TenantInfo, create_tenant
from tests.fakes.llm import FakeLLM
from tests.helpers import cli_env, konstruct_in_process, wait_until
from tests.shared import SharedWorker, shared_worker, unique_slug

LEFT, UP, ENTER, CTRL_C, CTRL_D = "\x1b[D", "\x1b[A", "\r", "\x03", "\x04"
ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[()][0-9A-Za-z]|\x1b[=>]|\x1b\][^\x07]*\x07")
ERASE_LINE = "\x1b[2K"

# The child makes the terminal its controlling one (a new session), so Ctrl-C typed there is SIGINT for it.
_CONTROLLING_TTY = (
    "import fcntl, os, sys, termios; os.setsid(); fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
    "os.execv(sys.executable, [sys.executable, '-m', 'konstruct', *sys.argv[1:]])"
)


class Terminal:
    """One `konstruct chat` process on a pseudo-terminal of 200 columns."""

    def __init__(self, config: Path, *args: str) -> None:
        self.master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
        env = cli_env(TERM="xterm")
        env.pop("COLUMNS", None)  # the terminal's own size, as for a person
        self.process = subprocess.Popen(
            [sys.executable, "-c", _CONTROLLING_TTY, "--config", str(config), "chat", *args],
            stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True,
        )  # fmt: skip
        os.close(slave)
        self.raw = ""  # everything printed, escape sequences included
        self.seen = 0  # how far `expect` has matched in the text without escape sequences

    @property
    def text(self) -> str:
        return ANSI.sub("", self.raw).replace("\r", "")

    def _pump(self, wait: float) -> bool:
        """Read what is there within `wait` seconds; False once the process has closed the terminal."""
        ready, _, _ = select.select([self.master], [], [], wait)
        if not ready:
            return True
        try:
            chunk = os.read(self.master, 65536)
        except OSError:  # EIO: the other side is closed
            return False
        self.raw += chunk.decode(errors="replace")
        return bool(chunk)

    def expect(self, wanted: str, timeout: float = 30) -> str:
        """Wait until `wanted` is printed after what was expected last; returns the text printed up to it."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.text.find(wanted, self.seen)
            if found >= 0:
                before, self.seen = self.text[self.seen : found], found + len(wanted)
                return before
            if time.monotonic() > deadline or not self._pump(min(0.1, max(deadline - time.monotonic(), 0))):
                raise AssertionError(f"timed out waiting for {wanted!r}; the terminal shows:\n{self.text[self.seen :]}")

    def type(self, keys: str) -> None:
        os.write(self.master, keys.encode())

    def exit_code(self, timeout: float) -> int:
        """Wait (reading what it prints) for the process to end within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while self.process.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"still running {timeout}s later; the terminal shows:\n{self.text}")
            self._pump(0.05)
        while self._pump(0):  # the rest of what it printed
            pass
        return self.process.returncode

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        os.close(self.master)


@dataclass
class Site:
    config: Path
    settings: Settings
    db: Database
    tenant: TenantInfo
    opened: list[Terminal]  # closed (killed if still running) after the test

    def chat(self, *args: str) -> Terminal:
        """`konstruct chat` with Ava of this test's tenant, as pat, on a terminal of its own (closed after the test)."""
        terminal = Terminal(self.config, "--tenant", self.tenant.slug, "--agent", "Ava", "--person", "pat", *args)
        self.opened.append(terminal)
        return terminal

    async def said(self) -> list[str]:
        """What the person's messages stored for this tenant say, oldest first."""
        async with self.db.tenant(tenant_id=self.tenant.id) as session:
            rows = await session.scalars(sql_select(Message.text).where(Message.direction == "in").order_by(Message.created_at))
            return list(rows)

    async def replies(self) -> list[str]:
        """What the agent's stored replies for this tenant say, oldest first."""
        async with self.db.tenant(tenant_id=self.tenant.id) as session:
            rows = await session.scalars(sql_select(Message.text).where(Message.direction == "out").order_by(Message.created_at))
            return list(rows)


@pytest.fixture(scope="module")
def tty_worker(
    pg_server: URL, template_db: str, fake_llm_server: FakeLLM, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SharedWorker]:
    with shared_worker(pg_server, template_db, tmp_path_factory.mktemp("tty"), fake_llm_server.url) as shared:
        yield shared


@pytest.fixture
async def site(tty_worker: SharedWorker, fake_llm: FakeLLM) -> AsyncIterator[Site]:
    settings = load_settings(tty_worker.config)
    db = Database(settings)
    opened: list[Terminal] = []
    try:
        tenant = await create_tenant(db, name="Acme", slug=unique_slug("acme"), actor="test")
        await create_agent(db, tenant, name="Ava", role="Support", persona="Warm and brief.", model=None, actor="test")
        yield Site(tty_worker.config, settings, db, tenant, opened)
    finally:
        for terminal in opened:
            terminal.close()
        await db.dispose()


PROMPT = "you> "


async def test_arrow_keys_edit_the_line_the_agent_is_seen_thinking_and_ctrl_c_leaves_at_once(site: Site, fake_llm: FakeLLM) -> None:
    fake_llm.delay = 1.0  # the model takes a moment, as a real one does
    chat = site.chat()
    chat.expect("Ctrl-D or Ctrl-C to leave")
    chat.expect(PROMPT)
    chat.type("helo" + LEFT + "l" + ENTER)
    chat.expect("Ava is thinking…")
    shown_at = len(chat.raw)
    chat.expect("Ava> [fake-model] You said: hello\n")
    assert ERASE_LINE in chat.raw[shown_at:]  # the indicator is cleared before the answer is printed
    assert not re.search(r"thinking…[^\n]*Ava> ", chat.text)  # not left on the answer's line
    assert await site.said() == ["hello"]  # what was stored is the edited line, no escape sequence in it
    assert fake_llm.requests[-1].body["messages"][-1]["content"] == "hello"

    chat.expect(PROMPT)
    chat.type(CTRL_C)  # at the prompt: no Enter needed after it
    assert chat.exit_code(timeout=10) == 130
    assert "Traceback" not in chat.text and "Error" not in chat.text

    history = site.settings.data_dir / HISTORY_FILE
    assert stat.S_IMODE(history.stat().st_mode) == 0o600
    assert history.read_text().splitlines()[-1] == "hello"


async def test_ctrl_c_while_the_agent_thinks_leaves_at_once_and_the_answer_comes_all_the_same(site: Site, fake_llm: FakeLLM) -> None:
    fake_llm.delay = 8.0  # longer than the process may take to leave (within llm.timeout, so the answer still comes)
    chat = site.chat("--new")
    chat.expect(PROMPT)
    chat.type("are you there?" + ENTER)
    chat.expect("Ava is thinking…")
    chat.type(CTRL_C)
    assert chat.exit_code(timeout=6) == 130
    assert "Stopped waiting" in chat.text and "Traceback" not in chat.text and "You said" not in chat.text
    assert await site.said() == ["are you there?"]
    replies = await wait_until(site.replies, lambda texts: len(texts) > 0, timeout=30, what="the answer, after the person left")
    assert replies == ["[fake-model] You said: are you there?"]


async def test_continuing_a_conversation_shows_its_last_turns_and_up_recalls_earlier_lines(site: Site, fake_llm: FakeLLM) -> None:
    first = site.chat()
    first.expect(PROMPT)
    for n in range(6):
        first.type(f"question {n}" + ENTER)
        first.expect(f"Ava> [fake-model] You said: question {n}\n")
        first.expect(PROMPT)
    first.type(CTRL_D)
    assert first.exit_code(timeout=10) == 0

    again = site.chat()
    # The last five exchanges, dimmed, in order, before the prompt; the first question has scrolled out.
    earlier = [line for n in range(1, 6) for line in (f"you> question {n}", f"Ava> [fake-model] You said: question {n}")]
    before = again.expect("Earlier in this conversation")
    assert "question" not in before
    again.expect("\n" + "\n".join(earlier) + "\n")
    assert again.expect(PROMPT) == ""
    assert "question 0" not in again.text
    assert "\x1b[2m" in again.raw  # dimmed
    again.type(UP + UP + ENTER)  # two lines back in the history: "question 4"
    again.expect("Ava> [fake-model] You said: question 4\n")
    again.expect(PROMPT)
    again.type(CTRL_D)
    assert again.exit_code(timeout=10) == 0
    assert (await site.said())[-1] == "question 4"

    fresh = site.chat("--new")
    before = fresh.expect(PROMPT)
    assert "Earlier" not in before and "question" not in before
    fresh.type(CTRL_D)
    assert fresh.exit_code(timeout=10) == 0


def test_no_indicator_where_the_output_is_read_by_a_program(site: Site, fake_llm: FakeLLM) -> None:
    one_shot = site.chat("--message", "just once")  # on a terminal, but one message: the reply alone
    assert one_shot.exit_code(timeout=30) == 0
    assert one_shot.text.strip() == "[fake-model] You said: just once"

    piped = konstruct_in_process("chat", "-t", site.tenant.slug, "-a", "Ava", "--new", config=site.config, input="from a pipe\n")
    assert piped.returncode == 0, piped.stderr
    assert "Ava> [fake-model] You said: from a pipe" in piped.stdout
    assert "thinking" not in piped.stdout + piped.stderr
