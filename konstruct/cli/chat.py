"""konstruct chat: talk to an agent from the terminal, through the real inbox → queue → worker path."""

from __future__ import annotations

import asyncio
import getpass
import uuid

import typer

from konstruct.agent.agents import get_agent
from konstruct.channels.terminal import ChatResult, chat
from konstruct.cli.common import database, err, out, print_json, run, settings, tenant_for
from konstruct.db.urls import resolve_urls
from konstruct.errors import KonstructError


def register(app: typer.Typer) -> None:
    app.command("chat")(chat_command)


def chat_command(
    ctx: typer.Context,
    tenant: str = typer.Option(..., "--tenant", "-t", help="The tenant's slug."),
    agent: str = typer.Option(..., "--agent", "-a", help="The agent's name."),
    message: str | None = typer.Option(None, "--message", "-m", help="Send one message, print the reply and exit."),
    conversation: str | None = typer.Option(None, "--conversation", help="Conversation id to continue (default: one per local user)."),
    new: bool = typer.Option(False, "--new", help="Start a fresh conversation."),
    message_id: str | None = typer.Option(None, "--message-id", help="Idempotency key: the same id sent twice gets one reply."),
    timeout: float | None = typer.Option(None, "--timeout", help="Seconds to wait for the reply (default: from llm.timeout and retries)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON (with --message)."),
    as_person: str | None = typer.Option(None, "--person", help="Who you speak as (default: your login name)."),
) -> None:
    """Chat with an agent. Needs a running worker (`konstruct up` or `konstruct worker`)."""
    cfg = settings(ctx)
    person = as_person or _local_user()
    key = conversation or (f"cli:{person}:{uuid.uuid4().hex[:8]}" if new else f"cli:{person}")
    wait = timeout or cfg.llm.timeout * (cfg.llm.retries + 1) + 15

    async def session(texts: list[str] | None) -> int:
        from konstruct.worker.queue import make_queue

        urls = resolve_urls(cfg)
        queue = make_queue(cfg, urls)
        try:
            async with database(cfg) as db:
                tenant_info = await tenant_for(db, tenant, "agent.test")
                agent_info = await get_agent(db, tenant_info, agent)

                async def send(text: str, mid: str | None) -> ChatResult:
                    return await chat(
                        db,
                        queue,
                        tenant_info,
                        agent_info.id,
                        text=text,
                        person=person,
                        conversation=key,
                        message_id=mid,
                        timeout=wait,
                        worker_within=cfg.worker.stale_after,
                    )

                if texts is not None:
                    result = await send(texts[0], message_id)
                    _print_result(agent_info.name, result, as_json, plain=True)
                    return 0 if result.status == "replied" else 1
                out.print(f"[dim]Chatting with {agent_info.name} ({agent_info.role}, {tenant_info.name}). Ctrl-D to leave.[/dim]")
                while True:
                    try:
                        text = await asyncio.to_thread(input, "you> ")
                    except EOFError:
                        out.print()
                        return 0
                    if not text.strip():
                        continue
                    try:
                        _print_result(agent_info.name, await send(text, None), False, plain=False)
                    except KonstructError as exc:
                        err.print(f"[red]Error:[/red] {exc}")
        finally:
            queue.close()

    code = run(session([message] if message is not None else None))
    raise typer.Exit(code)


def _print_result(agent: str, result: ChatResult, as_json: bool, *, plain: bool) -> None:
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
