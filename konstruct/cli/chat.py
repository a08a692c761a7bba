"""konstruct chat: talk to an agent from the terminal, through the real inbox → queue → worker path."""

from __future__ import annotations

import asyncio
import getpass
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import typer

from konstruct.agent.agents import AgentInfo, get_agent
from konstruct.channels.terminal import ChatResult, chat
from konstruct.cli.common import TenantOption, err, out, print_json, settings, tenant_for, with_database
from konstruct.config import Settings
from konstruct.db.engine import Database
from konstruct.db.urls import resolve_urls
from konstruct.errors import KonstructError
from konstruct.inbox import Doorbell
from konstruct.tenancy.tenants import TenantInfo
from konstruct.worker.queue import make_queue


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
    """Chat with an agent. Needs a running worker (`konstruct up` or `konstruct worker`)."""
    cfg = settings(ctx)
    person = as_person or _local_user()
    key = conversation or (new_conversation(person) if new else f"cli:{person}")

    async def session(db: Database) -> int:
        async with open_line(db, cfg, tenant, agent, person=person, conversation=key, timeout=timeout) as line:
            if message is not None:
                result = await line.send(message, message_id)
                print_result(line.agent.name, result, as_json, plain=True)
                return 0 if result.status == "replied" else 1
            await _talk(line)
            return 0

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

    async def send(self, text: str, message_id: str | None = None) -> ChatResult:
        """Send one message through the inbox and the queue, and wait for the worker's answer."""
        return await chat(self.db, self.queue, self.tenant, self.agent.id, text=text, person=self.person, conversation=self.conversation,
                          message_id=message_id, timeout=self.wait, worker_within=self.worker_within)  # fmt: skip


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
        yield Line(db, queue, tenant_info, agent_info, person, conversation, wait, cfg.worker.stale_after)
    finally:
        queue.close()


async def _talk(line: Line) -> None:
    out.print(f"[dim]Chatting with {line.agent.name} ({line.agent.role}, {line.tenant.name}). Ctrl-D to leave.[/dim]")
    while True:
        try:
            text = await asyncio.to_thread(input, "you> ")
        except EOFError:
            out.print()
            return
        if not text.strip():
            continue
        try:
            print_result(line.agent.name, await line.send(text), False, plain=False)
        except KonstructError as exc:  # the conversation goes on: one failed message is said, not fatal
            err.print(f"[red]Error:[/red] {exc}")


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
        err.print(f"[yellow]{agent} did not answer:[/yellow] {result.error}")
        return
    if plain:  # one-shot mode: just the reply on stdout, for scripts
        typer.echo(result.reply)
    else:
        out.print(f"[bold]{agent}>[/bold] {result.reply}")
    if result.status == "failed":
        err.print(f"[red]The agent could not answer:[/red] {result.error}")


def _local_user() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return "local"
