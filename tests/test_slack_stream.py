"""Answers streamed into Slack threads (DMs and channel mentions): chat.startStream, appendStream at a bounded rate,
stopStream with the feedback buttons; in a channel the placeholder shows until the stream does, then goes. What Slack
shows is exactly the stored reply, after a 429, a tool call, a refused stream or a worker SIGKILLed mid-stream or
between startStream and recording it. The gateway, worker, fake Slack and fake LLM (streaming at a fixed token rate)
are real processes/servers.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
from sqlalchemy import select

from konstruct.channels.slack.format import markdown_messages
from konstruct.db.models import InboundMessage as InboxRow
from konstruct.db.models import LLMUsage, Message
from tests import test_slack
from tests.fakes.slack import Call
from tests.helpers import konstruct_in_process, wait_for
from tests.test_slack import SlackSystem, message, new_ts

# The Slack module's own fixtures: a gateway and a worker for this module, a workspace and tenant per test.
fake_slack_server, fake_slack, stack, slack_system = (test_slack.fake_slack_server, test_slack.fake_slack, test_slack.stack,
                                                      test_slack.slack_system)  # fmt: skip

DM = "D0000000001"
CHANNEL = "C0000000001"
PERSON = "U0000000001"
INTERVAL = 0.4  # slack.stream_interval's default


def in_dm_thread(system: SlackSystem, text: str) -> str:
    """Post a person's message in a DM thread (the agent's Messages tab); return the thread's ts."""
    root = new_ts()
    response = system.post(system.event(message(root, text, channel=DM, channel_type="im", thread_ts=root)))
    assert response.status_code == 200
    return root


def calls(system: SlackSystem, method: str) -> list[Call]:
    return [c for c in system.slack.calls_to(method) if not c.rate_limited]


async def stored_replies(system: SlackSystem) -> list[Message]:
    async with system.db.tenant(tenant_id=system.tenant_id) as session:
        return list(await session.scalars(select(Message).where(Message.direction == "out")))


def bot_messages(system: SlackSystem, thread: str, where: str = DM) -> list[dict[str, Any]]:
    with system.slack._lock:
        return [
            dict(m)
            for (channel, _), m in system.slack.messages.items()
            if channel == where and m.get("thread_ts") == thread and m.get("bot_id")
        ]


def mention_in_channel(system: SlackSystem, text: str) -> str:
    """A person mentions the app in a channel; return the message's ts (the thread it is answered in)."""
    ts = new_ts()
    assert system.post(system.event(test_slack.mention(ts, f"<@U0000000BOT> {text}"))).status_code == 200
    return ts


def streamed_text(system: SlackSystem) -> str:
    """What was streamed, in order: startStream's text, every append's, stopStream's last piece."""
    every = [*calls(system, "chat.startStream"), *calls(system, "chat.appendStream"), *calls(system, "chat.stopStream")]
    return "".join(c.args.get("markdown_text") or "" for c in every)


def words(n: int) -> str:
    return " ".join(f"w{i}" for i in range(n))


async def test_a_streamed_answer_is_the_stored_reply_appended_at_a_bounded_rate(slack_system: SlackSystem) -> None:
    slack_system.llm.stream_delay = 0.05  # 20 tokens a second
    thread = in_dm_thread(slack_system, f"please repeat {words(80)}")
    wait_for(lambda: calls(slack_system, "chat.stopStream"), 30, f"the stream stopped; worker log:\n{slack_system.worker.log()}")
    await slack_system.wait_finished(1)
    [reply] = await stored_replies(slack_system)
    [shown] = bot_messages(slack_system, thread)
    assert shown["text"] == reply.text == f"[fake-model] You said: please repeat {words(80)}"
    # Assembled from several appends, in order, each a piece of the answer; under the text, the feedback buttons.
    [start] = calls(slack_system, "chat.startStream")
    appends = calls(slack_system, "chat.appendStream")
    pieces = [start.args["markdown_text"], *[c.args["markdown_text"] for c in appends]]
    stop = calls(slack_system, "chat.stopStream")[0]
    pieces += [stop.args["markdown_text"]] if stop.args.get("markdown_text") else []
    assert "".join(pieces) == reply.text and len(appends) >= 3
    assert start.args["thread_ts"] == thread and start.args["channel"] == DM
    assert [b["type"] for b in shown["blocks"]] == ["markdown", "context_actions"]
    assert shown["blocks"][1]["block_id"] == f"konstruct_feedback:{reply.id}"
    # Bounded: at most one append per interval while the model writes (~84 chunks over ~4.2 s: long enough for several appends even when the model's chunks come bunched on a busy machine), never one per token.
    assert all(b.at - a.at >= INTERVAL * 0.9 for a, b in zip([start, *appends], appends, strict=False))
    assert len(appends) <= (stop.at - start.at) / INTERVAL + 1 and len(appends) < 20
    # No placeholder and no update: the stream was the message. The model was asked once, streaming, usage recorded.
    assert calls(slack_system, "chat.postMessage") == [] and calls(slack_system, "chat.update") == []
    assert [r.body.get("stream") for r in slack_system.llm.requests] == [True]
    assert slack_system.llm.requests[0].body["stream_options"] == {"include_usage": True}
    async with slack_system.db.tenant(tenant_id=slack_system.tenant_id) as session:
        usage = (await session.scalars(select(LLMUsage))).one()
        inbox = (await session.scalars(select(InboxRow))).one()
    assert usage.completion_tokens == len(reply.text.split()) and usage.prompt_tokens > 0 and usage.error is None
    assert inbox.reply_ref == f"stream:{start_ts(slack_system)}" and reply.external_id == start_ts(slack_system)
    assert reply.status == "sent" and inbox.status == "replied"


def start_ts(system: SlackSystem) -> str:
    with system.slack._lock:
        return next(ts for (_, ts), s in system.slack.streams.items())


async def test_a_rate_limited_append_waits_for_retry_after(slack_system: SlackSystem) -> None:
    slack_system.llm.stream_delay = 0.05
    slack_system.slack.retry_after = 1
    slack_system.slack.rate_limit = {"chat.appendStream": 1}
    thread = in_dm_thread(slack_system, f"again {words(30)}")
    await slack_system.wait_finished(1)
    [reply] = await stored_replies(slack_system)
    [shown] = bot_messages(slack_system, thread)
    assert shown["text"] == reply.text and reply.text.endswith(words(30))
    every = slack_system.slack.calls_to("chat.appendStream")
    limited = [n for n, c in enumerate(every) if c.rate_limited]
    assert len(limited) == 1 and every[limited[0] + 1].args == every[limited[0]].args  # the same piece, again
    assert every[limited[0] + 1].at - every[limited[0]].at >= 0.95  # after Retry-After, not before


async def test_a_tool_call_turn_then_the_streamed_answer(slack_system: SlackSystem) -> None:
    updated = konstruct_in_process(
        "agent", "update", "Ava", "--tenant", slack_system.slug, "--tools", "calculator", config=slack_system.config
    )
    assert updated.returncode == 0, updated.stderr
    slack_system.llm.stream_delay = 0.02
    thread = in_dm_thread(slack_system, 'What is [[call calculator {"expression": "6*7+0.5"}]] ?')
    await slack_system.wait_finished(1)
    [reply] = await stored_replies(slack_system)
    assert reply.text == "[fake-model] Tool said: 42.5"
    [shown] = bot_messages(slack_system, thread)
    assert shown["text"] == reply.text  # the tool-call turn showed nothing; the answer streamed after the tool ran
    bodies = [r.body for r in slack_system.llm.requests]
    assert [b.get("stream") for b in bodies] == [True, True] and bodies[1]["messages"][-1]["role"] == "tool"
    assert calls(slack_system, "chat.update") == [] and len(calls(slack_system, "chat.startStream")) == 1
    async with slack_system.db.tenant(tenant_id=slack_system.tenant_id) as session:
        usage = list(await session.scalars(select(LLMUsage)))
    assert len(usage) == 2 and all(u.error is None for u in usage)  # one usage row per streamed call


async def test_text_written_with_a_tool_call_is_replaced_by_the_answer(slack_system: SlackSystem) -> None:
    """Some models say something before calling a tool: it streams, and the message ends up exactly the stored answer."""
    updated = konstruct_in_process(
        "agent", "update", "Ava", "--tenant", slack_system.slug, "--tools", "calculator", config=slack_system.config
    )
    assert updated.returncode == 0, updated.stderr
    slack_system.llm.tool_text = "Let me work that out."
    slack_system.llm.stream_delay = 0.02
    thread = in_dm_thread(slack_system, 'What is [[call calculator {"expression": "6*7"}]] ?')
    await slack_system.wait_finished(1)
    [reply] = await stored_replies(slack_system)
    [start] = calls(slack_system, "chat.startStream")
    streamed = "".join([start.args["markdown_text"], *[c.args["markdown_text"] for c in calls(slack_system, "chat.appendStream")]])
    assert streamed and "Let me work that out.\n\n[fake-model] Tool said: 42".startswith(streamed)  # as far as it got
    [shown] = bot_messages(slack_system, thread)
    assert shown["blocks"][0] == {"type": "markdown", "text": reply.text} and reply.text == "[fake-model] Tool said: 42"
    assert [b["type"] for b in shown["blocks"]] == ["markdown", "context_actions"]
    [update] = calls(slack_system, "chat.update")
    assert update.args["ts"] == shown["ts"] and calls(slack_system, "chat.stopStream")[0].args.get("blocks") is None


async def test_an_answer_over_slacks_limit_streams_then_is_split(slack_system: SlackSystem) -> None:
    question = " ".join(f"word{n}" for n in range(2000))  # echoed: over 12,000 characters
    thread = in_dm_thread(slack_system, question)
    await slack_system.wait_finished(1)
    [reply] = await stored_replies(slack_system)
    parts = markdown_messages(reply.text)
    assert len(parts) >= 2
    every = [calls(slack_system, "chat.startStream")[0], *calls(slack_system, "chat.appendStream")]
    assert sum(len(c.args["markdown_text"]) for c in every) <= 12_000  # the stream stopped growing at the limit
    shown = sorted(bot_messages(slack_system, thread), key=lambda m: tuple(int(x) for x in m["ts"].split(".")))
    assert [m["blocks"][0]["text"] for m in shown] == [p["blocks"][0]["text"] for p in parts]  # split as any reply
    assert shown[0]["ts"] == every[0].args.get("ts", shown[0]["ts"]) and reply.external_id == shown[0]["ts"]
    assert [b["type"] for b in shown[-1]["blocks"]] == ["markdown", "context_actions"]


async def test_a_worker_killed_mid_stream_leaves_one_complete_answer(slack_system: SlackSystem) -> None:
    slack_system.llm.stream_delay = 0.1  # ~8 s of streaming: the worker dies in the middle of it
    question = f"a long one {words(80)}"
    thread = in_dm_thread(slack_system, question)
    wait_for(lambda: len(calls(slack_system, "chat.appendStream")) >= 2, 30, f"appends; worker log:\n{slack_system.worker.log()}")
    slack_system.worker.kill()  # SIGKILL: no cleanup, the stream is left open with half an answer
    half = bot_messages(slack_system, thread)
    assert len(half) == 1 and half[0]["text"] and not half[0]["text"].endswith(words(80)[-3:])
    slack_system.llm.stream_delay = 0.0
    slack_system.stack.replace_worker()
    await slack_system.wait_finished(1, timeout=60)
    [reply] = await stored_replies(slack_system)
    shown = bot_messages(slack_system, thread)
    assert len(shown) == 1 and shown[0]["ts"] == half[0]["ts"]  # the same message, not a second one
    assert shown[0]["text"] == reply.text == f"[fake-model] You said: {question}"
    assert [b["type"] for b in shown[0]["blocks"]] == ["markdown", "context_actions"]
    with slack_system.slack._lock:
        assert slack_system.slack.streams[(DM, half[0]["ts"])]["state"] == "stopped"  # closed by the retry, then replaced
    [update] = calls(slack_system, "chat.update")
    assert update.args["ts"] == half[0]["ts"] and calls(slack_system, "chat.postMessage") == []
    assert reply.external_id == half[0]["ts"] and reply.status == "sent"


async def test_a_stream_slack_refuses_at_start_is_sent_whole(slack_system: SlackSystem) -> None:
    slack_system.slack.refuse = {"chat.startStream": "feature_disabled"}
    slack_system.llm.stream_delay = 0.01
    thread = in_dm_thread(slack_system, f"refused {words(10)}")
    await slack_system.wait_finished(1)
    [reply] = await stored_replies(slack_system)
    [shown] = bot_messages(slack_system, thread)
    assert shown["blocks"][0] == {"type": "markdown", "text": reply.text} and reply.text.endswith(words(10))
    assert [b["type"] for b in shown["blocks"]] == ["markdown", "context_actions"]
    [post] = calls(slack_system, "chat.postMessage")  # the answer, posted once it was whole
    assert post.args["thread_ts"] == thread and calls(slack_system, "chat.appendStream") == []
    assert reply.external_id == shown["ts"] and reply.status == "sent"


async def test_a_channel_mention_shows_its_placeholder_until_the_stream_does(slack_system: SlackSystem) -> None:
    slack_system.llm.stream_delay = 0.05
    thread = mention_in_channel(slack_system, f"please repeat {words(40)}")
    await slack_system.wait_finished(1)
    [reply] = await stored_replies(slack_system)
    [shown] = bot_messages(slack_system, thread, CHANNEL)
    assert shown["text"] == reply.text == f"[fake-model] You said: please repeat {words(40)}"
    assert [b["type"] for b in shown["blocks"]] == ["markdown", "context_actions"]
    # The placeholder first, then the stream in the thread, for the person who asked (Slack requires it in a channel).
    [placeholder] = calls(slack_system, "chat.postMessage")
    [start] = calls(slack_system, "chat.startStream")
    appends = calls(slack_system, "chat.appendStream")
    assert placeholder.args["text"] == "_thinking…_" and placeholder.args["thread_ts"] == thread
    assert start.args["channel"] == CHANNEL and start.args["thread_ts"] == thread
    assert start.args["recipient_user_id"] == PERSON and start.args["recipient_team_id"] == slack_system.team
    assert streamed_text(slack_system) == reply.text and len(appends) >= 3
    # The placeholder went as soon as the answer showed (before the next piece): no orphan, nothing updated.
    [delete] = calls(slack_system, "chat.delete")
    placeholder_ts = slack_system.slack.deleted[0]["ts"]
    assert delete.args["ts"] == placeholder_ts and placeholder.at < start.at < delete.at < appends[0].at
    assert slack_system.slack.deleted[0]["text"] == "_thinking…_" and calls(slack_system, "chat.update") == []
    async with slack_system.db.tenant(tenant_id=slack_system.tenant_id) as session:
        inbox = (await session.scalars(select(InboxRow))).one()
    assert inbox.reply_ref == f"stream:{shown['ts']}" and reply.external_id == shown["ts"] and reply.status == "sent"


async def test_a_stream_slack_refuses_in_a_channel_falls_back_to_the_placeholder(slack_system: SlackSystem) -> None:
    slack_system.slack.refuse = {"chat.startStream": "feature_disabled"}
    slack_system.llm.stream_delay = 0.01
    thread = mention_in_channel(slack_system, f"refused {words(10)}")
    await slack_system.wait_finished(1)
    [reply] = await stored_replies(slack_system)
    [shown] = bot_messages(slack_system, thread, CHANNEL)
    [placeholder] = calls(slack_system, "chat.postMessage")
    [update] = calls(slack_system, "chat.update")  # the placeholder became the answer, whole
    assert placeholder.args["text"] == "_thinking…_" and update.args["ts"] == shown["ts"] == reply.external_id
    assert shown["blocks"][0] == {"type": "markdown", "text": reply.text} and reply.text.endswith(words(10))
    assert [b["type"] for b in shown["blocks"]] == ["markdown", "context_actions"]
    assert calls(slack_system, "chat.delete") == [] and calls(slack_system, "chat.appendStream") == []


@pytest.mark.parametrize("where", ["dm", "channel"])
async def test_a_worker_killed_between_start_stream_and_recording_it_leaves_one_answer(slack_system: SlackSystem, where: str) -> None:
    """Slack created the stream (its first words show) but the worker died before it wrote the stream's ts down: the
    pending marker it recorded first sends the retry looking, and the answer replaces that stream."""
    held = threading.Event()
    slack_system.slack.hold["chat.startStream"] = held  # the stream is created; its ts reaches the worker only later
    slack_system.llm.stream_delay = 0.02
    question = f"in the window {words(20)}"
    channel = DM if where == "dm" else CHANNEL
    thread = in_dm_thread(slack_system, question) if where == "dm" else mention_in_channel(slack_system, question)
    wait_for(lambda: slack_system.slack.streams, 30, f"a stream; worker log:\n{slack_system.worker.log()}")
    slack_system.worker.kill()  # SIGKILL, inside the window
    held.set()
    del slack_system.slack.hold["chat.startStream"]
    [orphan] = [m for m in bot_messages(slack_system, thread, channel) if m["ts"] in {ts for _, ts in slack_system.slack.streams}]
    async with slack_system.db.tenant(tenant_id=slack_system.tenant_id) as session:
        inbox = (await session.scalars(select(InboxRow))).one()
    assert inbox.status == "processing" and orphan["text"] and not orphan["text"].endswith(words(20))
    assert inbox.reply_ref is None or orphan["ts"] not in inbox.reply_ref  # the stream's ts was never recorded
    slack_system.llm.stream_delay = 0.0
    slack_system.stack.replace_worker()
    await slack_system.wait_finished(1, timeout=60)
    [reply] = await stored_replies(slack_system)
    assert reply.text == f"[fake-model] You said: {question}"
    # Exactly one answer in the thread, whole, in the stream the dead worker left; nothing still streaming.
    [shown] = bot_messages(slack_system, thread, channel)
    assert shown["ts"] == orphan["ts"] == reply.external_id and shown["text"] == reply.text and reply.status == "sent"
    assert [b["type"] for b in shown["blocks"]] == ["markdown", "context_actions"]
    with slack_system.slack._lock:
        assert [s["state"] for s in slack_system.slack.streams.values()] == ["stopped"]
    assert len(calls(slack_system, "chat.startStream")) == 1  # the retry streamed nothing new
    if where == "channel":  # the placeholder is gone
        assert [m["text"] for m in slack_system.slack.deleted] == ["_thinking…_"]
