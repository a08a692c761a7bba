"""konstruct chat: talk to an agent from the terminal, through the real inbox → queue → worker path."""

from __future__ import annotations

import asyncio
import getpass
import os
import signal
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager, nullcontext, suppress
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape

from konstruct import approvals
from konstruct.agent.agents import AgentInfo, get_agent
from konstruct.channels.terminal import ChatResult, chat, clean_input, human_answers, recent_turns
from konstruct.cli.common import TenantOption, actor, err, out, print_json, settings, tenant_for, who, with_database
from konstruct.config import Settings
from konstruct.db.engine import Database
from konstruct.db.urls import resolve_urls
from konstruct.errors import KonstructError
from konstruct.inbox import Doorbell
from konstruct.tenancy.tenants import TenantInfo
from konstruct.worker.queue import make_queue

HISTORY_FILE = "chat_history"  # in the data directory: the lines typed at `konstruct chat`, 0600
HISTORY_LINES = 1000
SHOWN_EXCHANGES = 5  # of a conversation being continued


def register(app: typer.Typer) -> None:
    app.command("chat")(chat_command)


def chat_command(
    ctx: typer.Context,
    tenant: str = TenantOption,
    agent: str = typer.Option(..., "--agent", "-a", help="The agent's name."),
    message: str | None = typer.Option(None, "--message", "-m", help="Send one message, print the reply and exit."),
    conversation: str | None = typer.Option(None, "--conversation", help="Conversation id to continue (default: one per local user)."),
    new: bool = typer.Option(False, "--new", help="Start a fresh conversation."),
    message_id: str | None = typer.Option(None, "--message-id", help="Idempotency key: the same id sent twice gets one reply."),
    timeout: float | None = typer.Option(None, "--timeout", help="Seconds to wait for the reply (default: from llm.timeout and retries)."),
    # Not the shared JsonOption: here JSON replaces the reply, not a table, and only with --message.
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON (with --message)."),
    as_person: str | None = typer.Option(None, "--person", help="Who you speak as (default: your login name)."),
) -> None:
    """Chat with an agent. Needs a running worker (`konstruct up` or `konstruct worker`).

    Interactive on a terminal: arrow keys edit the line, up/down recall earlier lines (kept in chat_history in the
    data directory), and continuing a conversation shows its last exchanges first. Ctrl-D leaves (exit code 0);
    Ctrl-C leaves at once, at the prompt or while the agent thinks (exit code 130, as for any interrupted command).
    """
    cfg = settings(ctx)
    person = as_person or _local_user()
    key = conversation or (new_conversation(person) if new else f"cli:{person}")

    async def session(db: Database) -> int:
        async with open_line(db, cfg, tenant, agent, person=person, conversation=key, timeout=timeout) as line:
            if message is not None:
                seen = await line.last_said()
                result = await line.send(message, message_id)
                if not as_json:
                    await line.show_human_answers(seen)
                print_result(line.agent.name, result, as_json, plain=True)
                return 0 if result.status == "replied" else 1
            return await _talk(line, cfg.data_dir / HISTORY_FILE, resume=not new)

    raise typer.Exit(with_database(ctx, session))


def new_conversation(person: str) -> str:
    """The key of a fresh terminal conversation of this person."""
    return f"cli:{person}:{uuid.uuid4().hex[:8]}"


@dataclass
class Line:
    """An open terminal conversation with one agent of one tenant."""

    db: Database
    queue: Doorbell
    tenant: TenantInfo
    agent: AgentInfo
    person: str
    conversation: str
    wait: float
    worker_within: float
    operator: bool = False  # the acting user may decide approvals for the tenant's operators

    async def last_said(self) -> datetime | None:
        """When the person last wrote in this conversation (None: never): what humans answered since is news to them."""
        turns = await recent_turns(self.db, self.tenant, self.agent.id, self.conversation, exchanges=1)
        said = [t.at for t in turns if t.direction == "in"]
        return said[-1] if said else None

    async def show_human_answers(self, after: datetime | None) -> datetime | None:
        """Print what human colleagues answered after `after` (an escalated conversation); the latest one's time."""
        for turn in (answers := await human_answers(self.db, self.tenant, self.agent.id, self.conversation, after=after)):
            out.print(f"[bold magenta]{escape(turn.author)} (human)>[/bold magenta] {escape(turn.text)}")
        return answers[-1].at if answers else after

    async def send(self, text: str, message_id: str | None = None) -> ChatResult:
        """Send one message through the inbox and the queue, and wait for the worker's answer."""
        return await chat(self.db, self.queue, self.tenant, self.agent.id, text=text, person=self.person, conversation=self.conversation,
                          message_id=message_id, timeout=self.wait, worker_within=self.worker_within,
                          on_approval=self.approve)  # fmt: skip

    async def approve(self, pending: approvals.ApprovalInfo) -> None:
        """The agent waits to call a tool: ask y/n here and decide (as the person, or as an operator for the operators)."""
        shown = ", ".join(f"{key}={value!r}" for key, value in pending.arguments.items())
        if pending.approver == approvals.OPERATORS and not self.operator:
            err.print(
                f"[yellow]Waiting for an operator[/yellow] to approve {escape(pending.tool)}: `konstruct approval approve {pending.id}`"
            )
            return
        err.print(f"[bold]{escape(self.agent.name)}[/bold] wants to call [bold]{escape(pending.tool)}[/bold]({escape(shown)}).")
        err.print("Allow it? \\[y/N] ", end="")  # on stderr: stdout keeps only the reply (or its JSON)
        answer = _read_line("")
        if isinstance(answer, int):  # no terminal to answer on (or Ctrl-D): someone else decides
            err.print(f"[dim]Not decided here: `konstruct approval approve|deny {pending.id} --tenant {self.tenant.slug}`[/dim]")
            return
        person = pending.approver == approvals.PERSON
        decider = approvals.Decider(f"terminal:{self.person}", channel="terminal", person=self.person) if person else \
            approvals.Decider(actor(), operator=True)  # fmt: skip
        decision = await approvals.decide(self.db, self.queue, tenant_id=self.tenant.id, approval_id=pending.id,
                                          approve=clean_input(answer).lower() in ("y", "yes"), decider=decider)  # fmt: skip
        err.print(f"[dim]{decision.approval.status}.[/dim]")


@asynccontextmanager
async def open_line(
    db: Database, cfg: Settings, tenant: str, agent: str, *, person: str, conversation: str, timeout: float | None
) -> AsyncIterator[Line]:
    """A conversation with the named agent, once the acting user may test the tenant's agents (the wizard's test too)."""
    queue = make_queue(cfg, resolve_urls(cfg))
    try:
        tenant_info = await tenant_for(db, tenant, "agent.test")
        agent_info = await get_agent(db, tenant_info, agent)
        wait = timeout or cfg.llm.timeout * (cfg.llm.retries + 1) + 15
        operator = (await who(db)).can("approval.decide", tenant_info.id)
        yield Line(db, queue, tenant_info, agent_info, person, conversation, wait, cfg.worker.stale_after, operator)
    finally:
        queue.close()


async def _talk(line: Line, history: Path | None, *, resume: bool) -> int:
    """The interactive conversation: 0 when left with Ctrl-D, 130 when left with Ctrl-C (at the prompt or while
    waiting for an answer, which then stays queued and is answered all the same)."""
    terminal = sys.stdin.isatty() and out.is_terminal
    out.print(f"[dim]Chatting with {escape(line.agent.name)} ({escape(line.agent.role)}, {escape(line.tenant.name)}). "
              "Ctrl-D or Ctrl-C to leave.[/dim]")  # fmt: skip
    if resume:
        await _show_earlier(line)
    seen = await line.last_said()
    with line_editing(history if sys.stdin.isatty() else None):
        while True:
            seen = await line.show_human_answers(seen)  # an escalated conversation: what the humans said meanwhile
            text = _read_line("you> ")
            if isinstance(text, int):
                out.print()
                return text
            if not clean_input(text):
                continue  # Enter on an empty line shows what humans answered meanwhile
            try:
                with out.status(f"{escape(line.agent.name)} is thinking…") if terminal else nullcontext():
                    result = await line.send(text)
            except asyncio.CancelledError:  # Ctrl-C while waiting: asyncio cancels the task that runs the command
                err.print("[yellow]Stopped waiting:[/yellow] the message stays queued and is answered; you see it when you come back.")
                return 130
            except KonstructError as exc:  # the conversation goes on: one failed message is said, not fatal
                err.print(f"[red]Error:[/red] {escape(str(exc))}")
                continue
            print_result(line.agent.name, result, False, plain=False)


def _read_line(prompt: str) -> str | int:
    """One line from the person, or the exit code to leave with: 0 for Ctrl-D, 130 for Ctrl-C.

    The prompt blocks the event loop on purpose: nothing else runs on it between turns, and only so does Ctrl-C
    interrupt at once (asyncio's own handler would cancel a task that cannot run before the next Enter)."""
    on_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, signal.default_int_handler) if on_main else None
    try:
        return input(prompt)
    except EOFError:
        return 0
    except KeyboardInterrupt:
        return 130
    finally:
        if on_main:
            signal.signal(signal.SIGINT, signal.default_int_handler if previous is None else previous)


async def _show_earlier(line: Line) -> None:
    """The last exchanges of the conversation being continued, dimmed, so the person knows where they left off."""
    turns = await recent_turns(line.db, line.tenant, line.agent.id, line.conversation, exchanges=SHOWN_EXCHANGES)
    if not turns:
        return
    out.print(f"[dim]Earlier in this conversation (the last {SHOWN_EXCHANGES} exchanges at most; --new for a fresh one):[/dim]")
    for turn in turns:
        who = "you" if turn.direction == "in" else (f"{turn.author} (human)" if turn.human else line.agent.name)
        out.print(f"[dim]{escape(who)}> {escape(turn.text)}[/dim]")


@contextmanager
def line_editing(history: Path | None) -> Iterator[None]:
    """Line editing (arrow keys, Ctrl-A/E, …) and history (up/down) for input() on a terminal, with the lines kept
    in a 0600 file between sessions. None: no terminal, input() reads plain lines."""
    if history is None:
        yield
        return
    import readline  # only for a terminal: importing it changes how input() reads

    readline.set_history_length(HISTORY_LINES)
    with suppress(OSError):
        readline.read_history_file(history)
    try:
        yield
    finally:
        _save_history(readline, history)


def _save_history(readline: Any, path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))  # created private, before any line is in it
        os.chmod(path, 0o600)
        readline.write_history_file(path)
    except OSError as exc:  # the conversation happened; only its input history is not kept
        err.print(f"[yellow]Could not keep the chat history in {path}:[/yellow] {exc.strerror}")


def print_result(agent: str, result: ChatResult, as_json: bool, *, plain: bool) -> None:
    if as_json:
        print_json(
            {
                "message_id": str(result.message_id),
                "status": result.status,
                "reply": result.reply,
                "error": result.error,
                "duplicate": result.duplicate,
                "seconds": round(result.seconds, 3),
            }
        )
        return
    if result.status == "ignored":
        err.print(f"[yellow]{escape(agent)} did not answer:[/yellow] {escape(result.error or '')}")
        return
    if plain:  # one-shot mode: just the reply on stdout, for scripts
        typer.echo(result.reply)
    else:
        out.print(f"[bold]{escape(agent)}>[/bold] {escape(result.reply or '')}")
    if result.status == "failed":
        err.print(f"[red]The agent could not answer:[/red] {escape(result.error or '')}")


def _local_user() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return "local"
