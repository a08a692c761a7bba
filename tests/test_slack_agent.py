"""Slack's agent experience, end to end: a thinking status (with what the agent does) instead of a placeholder in
DMs, a thread titled from its first question, suggested prompts when the Messages tab opens, and a retry after a
crash that posts nothing twice. The gateway, worker and fakes are tests/test_slack.py's (one stack per module)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient
from sqlalchemy import select, update

from konstruct.db.models import InboundMessage as InboxRow
from tests import test_slack
from tests.fakes.slack import Call, FakeSlack
from tests.helpers import konstruct_in_process, wait_for
from tests.test_slack import SlackSystem, mention, message, new_ts

# tests/test_slack.py's fixtures: a gateway and worker for this module, a tenant and workspace per test.
fake_slack_server, fake_slack, stack, slack_system = (
    test_slack.fake_slack_server,
    test_slack.fake_slack,
    test_slack.stack,
    test_slack.slack_system,
)

DM = "D0000000007"
AGENT_CALLS = ("assistant.threads.setStatus", "assistant.threads.setTitle", "assistant.threads.setSuggestedPrompts")


def dm(ts: str, text: str, **extra: Any) -> dict[str, Any]:
    return message(ts, text, channel=DM, channel_type="im", **extra)


def thread_calls(system: SlackSystem) -> list[Call]:
    """The calls that show progress or the answer, in the order Slack got them."""
    with system.slack._lock:
        calls = list(system.slack.calls)
    shown = (*AGENT_CALLS, "chat.postMessage", "chat.update", "chat.startStream", "chat.delete")
    return [c for c in calls if c.method in shown and not c.rate_limited]


def wait_answer(system: SlackSystem, channel: str, n: int = 1) -> list[dict[str, Any]]:
    """Until `n` answers are in the channel, whole: none still streaming (DM answers are streamed), and no placeholder
    left (a channel's shows until the stream has text, and then goes)."""

    def whole() -> bool:
        with system.slack._lock:
            streaming = any(s["state"] == "streaming" for (c, _), s in system.slack.streams.items() if c == channel)
        shown = system.slack.messages_in(channel)
        return len(shown) >= n and not streaming and all(m.get("text") != "_thinking…_" for m in shown)

    wait_for(whole, 30, f"{n} answer(s) in {channel}; worker log:\n{system.worker.log()}")
    return system.slack.messages_in(channel)


def cli(system: SlackSystem, *args: str) -> Any:
    return konstruct_in_process(*args, config=system.stack.config)


async def test_a_dm_shows_a_status_not_a_placeholder_and_is_titled_once(slack_system: SlackSystem) -> None:
    root = new_ts()
    assert slack_system.post(slack_system.event(dm(root, "What are your opening hours on Sundays?"))).status_code == 200
    [answer] = wait_answer(slack_system, DM)
    assert answer["thread_ts"] == root and answer["text"] == "[fake-model] You said: What are your opening hours on Sundays?"
    calls = thread_calls(slack_system)
    # Title, then status, then the answer streamed in the thread: no `_thinking…_` placeholder, nothing updated.
    assert [c.method for c in calls] == ["assistant.threads.setTitle", "assistant.threads.setStatus", "chat.startStream"]
    title, status, post = (c.args for c in calls)
    assert (title["channel_id"], title["thread_ts"], title["title"]) == (DM, root, "What are your opening hours on Sundays?")
    assert (status["channel_id"], status["thread_ts"], status["status"]) == (DM, root, "is thinking…")
    assert loading(status) == ["reading the thread…"]
    assert post["thread_ts"] == root and "_thinking" not in post["markdown_text"]
    assert slack_system.slack.statuses == {}  # Slack cleared it when the answer began in the thread
    # A follow-up in that thread: a status again, but the thread keeps its title (set once, from the first question).
    assert slack_system.post(slack_system.event(dm(new_ts(), "and on holidays?", thread_ts=root))).status_code == 200
    wait_answer(slack_system, DM, 2)
    assert len(slack_system.slack.calls_to("assistant.threads.setTitle")) == 1
    assert len(slack_system.slack.calls_to("assistant.threads.setStatus")) == 2
    assert slack_system.slack.titles == {(DM, root): "What are your opening hours on Sundays?"}
    # The follow-up was answered with the thread's history: the thread is the conversation.
    assert [m["role"] for m in slack_system.llm.requests[-1].body["messages"][1:]] == ["user", "assistant", "user"]
    assert slack_system.updates() == []


async def test_an_answer_from_the_documents_names_its_sources_in_slack(slack_system: SlackSystem, tmp_path: Path) -> None:
    (tmp_path / "returns.md").write_text("# Refunds\n\nRefunds reach the original card within five working days.\n")
    added = cli(slack_system, "knowledge", "add", "--tenant", slack_system.slug, str(tmp_path / "returns.md"), "--json", "--timeout", "120")
    assert added.returncode == 0 and json.loads(added.stdout)["results"][0]["status"] == "added", added.stderr + added.stdout
    root = new_ts()
    assert slack_system.post(slack_system.event(dm(root, "When is my refund on my card?"))).status_code == 200
    [answer] = wait_answer(slack_system, DM)
    assert answer["text"].endswith("[returns.md]\n\nSources: returns.md")  # streamed, then made exactly the stored reply
    system = slack_system.llm.requests[-1].body["messages"][0]["content"]
    assert "Source: returns.md — Refunds\nRefunds reach the original card within five working days." in system


def loading(args: dict[str, Any]) -> list[str]:
    value = args.get("loading_messages")
    return [str(m) for m in (json.loads(value) if isinstance(value, str) else value or [])]


async def test_a_tool_call_shows_in_the_status(slack_system: SlackSystem) -> None:
    ok = cli(slack_system, "agent", "update", "Ava", "--tenant", slack_system.slug, "--tools", "calculator")
    assert ok.returncode == 0, ok.stderr
    root = new_ts()
    slack_system.post(slack_system.event(dm(root, 'What is [[call calculator {"expression": "6*7"}]] ?')))
    [answer] = wait_answer(slack_system, DM)
    assert answer["text"] == "[fake-model] Tool said: 42"
    statuses = [(c.method, loading(c.args) if c.method.endswith("setStatus") else None) for c in thread_calls(slack_system)]
    assert statuses == [
        ("assistant.threads.setTitle", None),
        ("assistant.threads.setStatus", ["reading the thread…"]),
        ("assistant.threads.setStatus", ["calling calculator…"]),  # while the tool ran, before the answer
        ("chat.startStream", None),
    ]


async def test_a_channel_mention_gets_a_placeholder_until_its_answer_streams(slack_system: SlackSystem) -> None:
    """No status outside an agent thread: the placeholder shows the agent working, and goes once the stream shows text
    (tests/test_slack_stream.py has the details)."""
    ts = new_ts()
    slack_system.post(slack_system.event(mention(ts)))
    [shown] = wait_answer(slack_system, "C0000000001")
    calls = thread_calls(slack_system)
    assert [c.method for c in calls] == ["chat.postMessage", "chat.startStream", "chat.delete"]
    assert calls[0].args["text"] == "_thinking…_" and calls[0].args["thread_ts"] == ts == calls[1].args["thread_ts"]
    assert shown["text"] == "[fake-model] You said: what is our refund policy?" and shown["ts"] != calls[2].args["ts"]


async def test_a_refused_status_falls_back_to_the_placeholder(slack_system: SlackSystem) -> None:
    """An app installed without the scope (Slack answers missing_scope): the person still sees the agent working, as in
    a channel: a placeholder until the answer streams."""
    slack_system.slack.refuse["assistant.threads.setStatus"] = "missing_scope"
    root = new_ts()
    slack_system.post(slack_system.event(dm(root, "hello there")))
    [shown] = wait_answer(slack_system, DM)
    methods = [c.method for c in thread_calls(slack_system)]
    assert methods == ["assistant.threads.setTitle", "assistant.threads.setStatus", "chat.postMessage", "chat.startStream", "chat.delete"]
    assert shown["thread_ts"] == root and shown["text"] == "[fake-model] You said: hello there"
    assert "recipient_user_id" not in slack_system.slack.calls_to("chat.startStream")[0].args  # a DM needs none


async def test_suggested_prompts_on_opening_the_messages_tab_not_the_home_tab(slack_system: SlackSystem) -> None:
    prompts = ["What is your refund policy?", "Where is my order? " + "Please look it up by my email address. " * 3]
    args = ["agent", "update", "Ava", "--tenant", slack_system.slug]
    ok = cli(slack_system, *args, *[x for p in prompts for x in ("--suggested-prompt", p)])
    assert ok.returncode == 0, ok.stderr
    opened = {"type": "app_home_opened", "user": "U0000000001", "channel": "D0000000008", "event_ts": new_ts()}
    assert slack_system.post(slack_system.event({**opened, "tab": "home"})).status_code == 200
    assert slack_system.post(slack_system.event({**opened, "channel": DM, "tab": "messages"})).status_code == 200
    wait_for(lambda: DM in slack_system.slack.suggested_prompts, 15, "suggested prompts set")
    [call] = slack_system.slack.calls_to("assistant.threads.setSuggestedPrompts")  # none for the Home tab
    assert "thread_ts" not in call.args  # an agent_view app sets them for the tab, not a thread
    shown = slack_system.slack.suggested_prompts[DM]["prompts"]
    assert [p["message"] for p in shown] == [p.strip() for p in prompts]  # as stored: surrounding spaces dropped
    assert shown[0]["title"] == prompts[0] and len(shown[1]["title"]) == 75 and shown[1]["title"].endswith("…")
    assert await slack_system.inbox_count() == 0  # an opening is no message: nothing stored, nothing answered
    # An agent without prompts: nothing is set when the tab opens.
    cleared = cli(slack_system, *args, "--clear-suggested-prompts")
    assert cleared.returncode == 0, cleared.stderr
    slack_system.post(slack_system.event({**opened, "channel": "D0000000009", "tab": "messages"}))
    slack_system.post(slack_system.event({**opened, "channel": "D0000000009", "tab": "home"}))
    marker = new_ts()  # then a DM answered: the opening before it has been handled by then
    slack_system.post(slack_system.event(dm(marker, "ping")))
    wait_answer(slack_system, DM)
    assert len(slack_system.slack.calls_to("assistant.threads.setSuggestedPrompts")) == 1


async def test_a_retry_after_a_crash_updates_the_answer_it_posted_instead_of_posting_again(slack_system: SlackSystem) -> None:
    """A worker posted the answer in the DM thread (no placeholder there) and died before recording the turn: the next
    attempt finds that message by its metadata and puts the answer there; nothing is posted twice."""
    slack_system.worker.stop()
    root = new_ts()
    assert slack_system.post(slack_system.event(dm(root, "what is our refund policy?"))).status_code == 200
    async with slack_system.db.tenant(tenant_id=slack_system.tenant_id) as session:
        row = (await session.scalars(select(InboxRow))).one()
        await session.execute(update(InboxRow).where(InboxRow.id == row.id).values(attempts=1, reply_ref=None))
    with slack_system.slack._lock:
        posted = slack_system.slack._chat_post_message(
            slack_system.slack.tokens[slack_system.bot_token],
            {"channel": DM, "text": "[fake-model] You said: what is our refund policy?", "thread_ts": root,
             "metadata": {"event_type": "konstruct_placeholder", "event_payload": {"answers": row.external_id}}},
        )  # fmt: skip
    slack_system.stack.replace_worker()
    slack_system.wait_updates(1)
    await slack_system.wait_finished(1)
    assert [c.args["ts"] for c in slack_system.updates()] == [posted["ts"]]
    assert slack_system.slack.calls_to("chat.postMessage") == []  # nothing posted by the retry
    assert slack_system.slack.calls_to("assistant.threads.setTitle") == []  # the first attempt titled the thread
    assert [m["text"] for m in slack_system.slack.messages_in(DM)] == ["[fake-model] You said: what is our refund policy?"]


async def test_an_answer_posted_without_a_placeholder_is_marked_for_a_retry(slack_system: SlackSystem) -> None:
    """What the test above relies on: the first message of a DM answer carries the metadata a retry looks for (a
    streamed answer gets it when the stream is stopped; until then the stream's ts is recorded as the reply_ref)."""
    root = new_ts()
    slack_system.post(slack_system.event(dm(root, "hi")))
    wait_answer(slack_system, DM)
    async with slack_system.db.tenant(tenant_id=slack_system.tenant_id) as session:
        external_id = (await session.scalars(select(InboxRow.external_id))).one()
    [post] = slack_system.slack.calls_to("chat.stopStream")
    metadata = post.args["metadata"]
    metadata = json.loads(metadata) if isinstance(metadata, str) else metadata
    assert metadata == {"event_type": "konstruct_placeholder", "event_payload": {"answers": external_id}}


async def test_suggested_prompts_on_the_command_line(slack_system: SlackSystem) -> None:
    tenant = ["--tenant", slack_system.slug]
    made = cli(slack_system, "agent", "create", *tenant, "--name", "Bo", "--role", "Sales", "--persona", "Keen.",
               "--suggested-prompt", "Show me the price list", "--suggested-prompt", "  Book a demo  ", "--json")  # fmt: skip
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout)["suggested_prompts"] == ["Show me the price list", "Book a demo"]
    shown = cli(slack_system, "agent", "show", "Bo", *tenant)
    assert shown.returncode == 0 and "Show me the price list | Book a demo" in shown.stdout
    five = [x for n in range(5) for x in ("--suggested-prompt", f"prompt {n}")]
    for bad, words in (
        (five, "at most 4"),
        (["--suggested-prompt", "   "], "must not be empty"),
        (["--suggested-prompt", "x", "--clear-suggested-prompts"], "not both"),
    ):
        refused = cli(slack_system, "agent", "update", "Bo", *tenant, *bad)
        assert refused.returncode == 1 and words in refused.stderr and "Traceback" not in refused.stderr, refused.stderr
    replaced = cli(slack_system, "agent", "update", "Bo", *tenant, "--suggested-prompt", "Only this", "--json")
    assert json.loads(replaced.stdout)["suggested_prompts"] == ["Only this"]
    cleared = cli(slack_system, "agent", "update", "Bo", *tenant, "--clear-suggested-prompts", "--json")
    assert json.loads(cleared.stdout)["suggested_prompts"] == []
    assert "(none)" in cli(slack_system, "agent", "show", "Bo", *tenant).stdout


async def test_the_fake_checks_the_agent_thread_calls_as_slack_does(fake_slack: FakeSlack) -> None:
    """The fake refuses what Slack refuses, so the tests above would catch a malformed call."""
    fake_slack.add_token("xoxb-fake-checks")
    client = AsyncWebClient(token="xoxb-fake-checks", base_url=fake_slack.url)

    async def error(method: str, **args: Any) -> str | None:
        try:
            await client.api_call(method, json=args)
        except SlackApiError as exc:
            return str(exc.response["error"])
        return None

    status = "assistant.threads.setStatus"
    assert await error(status, thread_ts="1.000001", status="is thinking…") == "channel_not_found"
    assert await error(status, channel_id=DM, thread_ts="yesterday", status="is thinking…") == "invalid_thread_ts"
    assert await error(status, channel_id=DM, thread_ts="1.000001") == "invalid_arguments"  # no status
    assert await error(status, channel_id=DM, thread_ts="1.000001", status="x", loading_messages=["m"] * 11) == "invalid_arguments"
    assert await error(status, channel_id=DM, thread_ts="1.000001", status="x", loading_messages=["m"] * 10) is None
    assert await error(status, channel_id=DM, thread_ts="1.000001", status="") is None  # an empty status clears it
    assert fake_slack.statuses == {}
    prompts = "assistant.threads.setSuggestedPrompts"
    one = {"title": "Refunds", "message": "What is your refund policy?"}
    assert await error(prompts, channel_id=DM, prompts=[one] * 5) == "invalid_arguments"
    assert await error(prompts, channel_id=DM, prompts=[]) == "invalid_arguments"
    assert await error(prompts, channel_id=DM, prompts=[{"title": "Refunds"}]) == "invalid_arguments"
    assert await error(prompts, prompts=[one]) == "channel_not_found"
    assert await error(prompts, channel_id=DM, thread_ts="1.000001", prompts=[one]) is None
    assert fake_slack.suggested_prompts == {}  # with a thread_ts an agent app's call sets nothing
    assert await error(prompts, channel_id=DM, prompts=[one] * 4) is None
    assert fake_slack.suggested_prompts[DM]["prompts"] == [one] * 4
    title = "assistant.threads.setTitle"
    assert await error(title, channel_id=DM, thread_ts="1.000001") == "invalid_arguments"
    assert await error(title, channel_id=DM, title="Refunds") == "invalid_thread_ts"
    assert await error(title, channel_id=DM, thread_ts="1.000001", title="Refunds") is None
    assert fake_slack.titles == {(DM, "1.000001"): "Refunds"}
