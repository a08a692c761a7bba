"""The agent's brain end to end: long-term memory, tools, escalation to a human, through a real worker and the CLI."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.engine import URL

from konstruct import audit
from konstruct.agent.agents import create_agent
from konstruct.agent.prompt import AI_DISCLOSURE
from konstruct.config import load_settings
from konstruct.db.engine import Database
from konstruct.db.models import Memory
from konstruct.llm.client import load_litellm, supports_vision
from konstruct.tenancy.tenants import TenantInfo, create_tenant
from tests.fakes.llm import FakeLLM
from tests.fakes.server import LoopbackServer, QuietHandler, serve, shutdown
from tests.fakes.slack import FakeSlack
from tests.helpers import Proc, cli_env, konstruct_in_process, wait_until
from tests.shared import SharedWorker, shared_worker, unique_slug

BOT_TOKEN = "xoxb-escalation-bot-0101"


@dataclass
class Brain:
    config: Path
    db: Database
    llm: FakeLLM
    acme: TenantInfo
    globex: TenantInfo
    worker: Proc

    def slug(self, name: str) -> str:
        """This test's tenant for the name the test uses ("acme", "globex"); anything else as it is."""
        return {"acme": self.acme.slug, "globex": self.globex.slug}.get(name, name)

    def chat(self, text: str, *, person: str = "pat", tenant: str = "acme", new: bool = True) -> Any:
        args = ["chat", "--tenant", tenant, "--agent", "Ava", "--person", person, "--message", text, "--json", "--timeout", "60"]
        result = self.cli(*args, *(["--new"] if new else []))
        assert result.stdout, result.stderr + self.worker.log()
        return json.loads(result.stdout)

    def cli(self, *args: str, env: dict[str, str] | None = None) -> Any:
        """The CLI in-process, "acme" and "globex" meaning this test's tenants."""
        return konstruct_in_process(*map(self.slug, args), config=self.config, env=env)

    def system_prompt(self, index: int = -1) -> str:
        return str(self.llm.requests[index].body["messages"][0]["content"])

    async def memories(self, tenant: TenantInfo) -> list[Memory]:
        async with self.db.tenant(tenant_id=tenant.id) as session:
            return list(await session.scalars(select(Memory)))


@pytest.fixture(scope="module")
def slack_fake() -> Iterator[FakeSlack]:
    fake = FakeSlack().start()
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def brain_worker(
    pg_server: URL, template_db: str, fake_llm_server: FakeLLM, slack_fake: FakeSlack, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SharedWorker]:
    """One worker (with memory on, so one embedding model load) for the module; each test has tenants of its own."""
    with shared_worker(
        pg_server, template_db, tmp_path_factory.mktemp("brain"), fake_llm_server.url, memory={"enabled": True},
        slack={"api_url": slack_fake.url}, agent={"web_fetch_private_networks": ["127.0.0.1/32"], "history_messages": 4},
    ) as shared:  # fmt: skip
        yield shared


@pytest.fixture
async def brain(brain_worker: SharedWorker, fake_llm: FakeLLM, slack_fake: FakeSlack) -> AsyncIterator[Brain]:
    slack_fake.reset()
    slack_fake.retry_after = 0
    db = Database(load_settings(brain_worker.config))
    try:
        acme = await create_tenant(db, name="Acme", slug=unique_slug("acme"), actor="test")
        globex = await create_tenant(db, name="Globex", slug=unique_slug("globex"), actor="test")
        for tenant in (acme, globex):
            await create_agent(db, tenant, name="Ava", role="Support", persona="Helpful and brief.", model=None, actor="test")
        yield Brain(brain_worker.config, db, fake_llm, acme, globex, brain_worker.worker)
    finally:
        await db.dispose()


async def test_a_fact_is_recalled_for_the_same_person_only(brain: Brain) -> None:
    told = brain.chat("My favourite colour is teal and I live in Lisbon.", person="pat")
    assert told["status"] == "replied"
    brain.chat("I prefer email over phone calls for updates.", person="pat")
    # Stored in the background (the worker loads the embedding model on first use).
    stored = await wait_until(lambda: brain.memories(brain.acme), lambda found: len(found) >= 2, 120, "two memories stored")
    assert sorted(m.content for m in stored) == [
        "I prefer email over phone calls for updates.",
        "My favourite colour is teal and I live in Lisbon.",
    ]
    assert all(m.person == "pat" for m in stored)

    brain.chat("What colour should my new bike be?", person="pat")  # a new conversation: only memory knows
    prompt = brain.system_prompt()
    assert "teal" in prompt and prompt.endswith(AI_DISCLOSURE)
    brain.chat("What colour should my new bike be?", person="sam")  # another person of the same tenant
    assert "teal" not in brain.system_prompt()
    brain.chat("What colour should my new bike be?", person="pat", tenant="globex")  # the same name in another tenant
    assert "teal" not in brain.system_prompt()
    assert await brain.memories(brain.globex) == []

    listed = brain.cli("memory", "list", "--tenant", "acme", "--person", "pat", "--json")
    assert len(json.loads(listed.stdout)) == 2
    forgot = brain.cli("memory", "forget", "--tenant", "acme", "--person", "pat", "--yes", "--json")
    assert forgot.returncode == 0, forgot.stderr
    assert json.loads(forgot.stdout) == {"person": "pat", "memories": 2, "conversations": 3}
    assert await brain.memories(brain.acme) == []
    events = await audit.events(brain.db, brain.acme.id)
    assert events[-1].action == "memory.forgotten" and events[-1].target == "pat"
    # Every prompt the model ever got carries the AI disclosure, last.
    assert all(str(r.body["messages"][0]["content"]).endswith(AI_DISCLOSURE) for r in brain.llm.requests)


async def test_tool_calls_round_trip_and_are_audited(brain: Brain) -> None:
    bad = brain.cli("agent", "update", "Ava", "--tenant", "acme", "--tools", "calculator,teleport")
    assert bad.returncode != 0 and "teleport" in bad.stderr and "Traceback" not in bad.stderr
    ok = brain.cli("agent", "update", "Ava", "--tenant", "acme", "--tools", "calculator,current_time")
    assert ok.returncode == 0, ok.stderr

    answer = brain.chat('What is [[call calculator {"expression": "6*7+0.5"}]] ?')
    assert answer["reply"] == "[fake-model] Tool said: 42.5"
    offered = {t["function"]["name"] for t in brain.llm.requests[-2].body["tools"]}
    assert offered == {"calculator", "current_time"}
    assert brain.llm.requests[-1].body["messages"][-1]["role"] == "tool"

    failing = brain.chat('Try [[call calculator {"expression": "1/0"}]] please')
    assert failing["status"] == "replied" and "error" in failing["reply"] and "zero" in failing["reply"]
    events = [e for e in await audit.events(brain.db, brain.acme.id) if e.action == "tool.called"]
    assert [(e.target, e.detail["ok"]) for e in events] == [("calculator", True), ("calculator", False)]
    assert events[0].detail["arguments"] == {"expression": "6*7+0.5"}


class PageHandler(QuietHandler):
    def do_GET(self) -> None:
        self.send_bytes(200, "text/html; charset=utf-8", b"<html><body><h1>Opening hours</h1><p>Mon to Fri, 9 to 5</p></body></html>")


@pytest.fixture(scope="module")
def page_server() -> Iterator[LoopbackServer]:
    server = serve(PageHandler, 0, "brain-web")
    yield server
    shutdown(server)


async def test_web_fetch_in_the_worker_reaches_the_listed_private_network_only(brain: Brain, page_server: LoopbackServer) -> None:
    """[agent] web_fetch_private_networks (127.0.0.1/32 for this worker) reaches the pipeline's tools: the loopback
    page is fetched, another private address is refused by the address check, not by the tenant's allow-list."""
    assert brain.cli("agent", "update", "Ava", "--tenant", "acme", "--tools", "web_fetch").returncode == 0
    hosts = brain.cli("tenant", "configure", "acme", "--allowed-hosts", "127.0.0.1,10.0.0.1")
    assert hosts.returncode == 0, hosts.stderr
    port = page_server.server_address[1]
    fetched = brain.chat(f'[[call web_fetch {{"url": "http://127.0.0.1:{port}/hours"}}]]')
    assert fetched["status"] == "replied" and "Mon to Fri, 9 to 5" in fetched["reply"], fetched
    refused = brain.chat('[[call web_fetch {"url": "http://10.0.0.1/admin"}]]')
    assert "10.0.0.1 resolves to a private or reserved address" in refused["reply"], refused


async def test_escalation_fires_notifies_silences_and_releases(brain: Brain, slack_fake: FakeSlack) -> None:
    bad = brain.cli("agent", "update", "Ava", "--tenant", "acme", "--escalation-rule", "refund OR (lawyer")
    assert bad.returncode != 0 and "position" in bad.stderr
    rules = ["refund OR lawyer", "billing AND count > 2"]
    set_rules = brain.cli("agent", "update", "Ava", "--tenant", "acme", *[a for r in rules for a in ("--escalation-rule", r)])
    assert set_rules.returncode == 0, set_rules.stderr
    dry = brain.cli("escalation", "test", "--tenant", "acme", "--agent", "Ava", "my billing is wrong", "--count", "3", "--json")
    assert json.loads(dry.stdout)["fired"] == "billing AND count > 2"
    dry = brain.cli("escalation", "test", "--tenant", "acme", "--agent", "Ava", "my billing is wrong", "--count", "1", "--json")
    assert json.loads(dry.stdout)["fired"] is None

    slack_fake.add_token(BOT_TOKEN, team_id="T0ESCALATE", team="Acme", user_id="U0BOT")
    env = cli_env(BOT=BOT_TOKEN, SIGNING="signing-secret-escalation")
    connected = brain.cli(
        "channel", "connect", "slack", "--tenant", "acme", "--bot-token-env", "BOT", "--signing-secret-env", "SIGNING", env=env
    )
    assert connected.returncode == 0, connected.stderr
    target = brain.cli("tenant", "configure", "acme", "--escalation-target", "slack:C0HUMANS")
    assert target.returncode == 0, target.stderr

    handed = brain.chat("I want a refund for my order", person="quinn", new=False)
    assert handed["status"] == "replied" and "human colleague" in handed["reply"]
    requests_before = len(brain.llm.requests)
    posts = [c for c in slack_fake.calls_to("chat.postMessage") if c.args.get("channel") == "C0HUMANS"]
    assert len(posts) == 1 and "refund" in posts[0].args["text"] and "conversation" in posts[0].args["text"]

    listed = json.loads(brain.cli("conversation", "list", "--tenant", "acme", "--escalated", "--json").stdout)
    assert len(listed) == 1 and listed[0]["person"] == "quinn" and listed[0]["category"] == "rule"
    # Silent while a human has it, and no second escalation however often the rule would fire.
    for text in ("hello? anyone?", "refund refund refund"):
        silent = brain.chat(text, person="quinn", new=False)
        assert silent["status"] == "ignored" and "human" in silent["error"]
    assert len(brain.llm.requests) == requests_before
    # One desk thread (no second card), the person's messages mirrored into it (tests/test_handoff.py has the rest).
    desk = [c for c in slack_fake.calls_to("chat.postMessage") if c.args.get("channel") == "C0HUMANS"]
    assert [c.args.get("thread_ts") for c in desk] == [None, *([slack_fake.messages_in("C0HUMANS")[0]["ts"]] * 2)]
    assert ["hello? anyone?" in desk[1].args["text"], "refund refund refund" in desk[2].args["text"]] == [True, True]

    released = brain.cli("conversation", "release", listed[0]["id"][:8], "--tenant", "acme")
    assert released.returncode == 0, released.stderr
    back = brain.chat("thanks, one more question", person="quinn", new=False)
    assert back["status"] == "replied" and back["reply"].endswith("one more question")

    # The model can escalate too, through its tool; `/release` from the thread hands it back.
    brain.cli("agent", "update", "Ava", "--tenant", "acme", "--tools", "escalate_to_human")
    brain.chat('[[call escalate_to_human {"reason": "wants a manager"}]]', person="rory", new=False)
    listed = json.loads(brain.cli("conversation", "list", "--tenant", "acme", "--escalated", "--json").stdout)
    assert [c["person"] for c in listed] == ["rory"] and "manager" in listed[0]["reason"] and listed[0]["category"] == "person_asked"
    assert brain.chat("/release", person="rory", new=False)["status"] == "ignored"
    assert json.loads(brain.cli("conversation", "list", "--tenant", "acme", "--escalated", "--json").stdout) == []
    actions = [e.action for e in await audit.events(brain.db, brain.acme.id)]
    assert actions.count("conversation.escalated") == 2 and actions.count("conversation.released") == 2


async def test_a_long_conversation_is_summarised_and_the_summary_kept(brain: Brain) -> None:
    for n in range(4):
        brain.chat(f"Part {n} of my story: I have {n + 2} cats.", person="uma", new=False)
    final = brain.chat("So how many cats did I mention first?", person="uma", new=False)
    assert final["status"] == "replied"
    summaries = [r for r in brain.llm.requests if "Summarise this conversation" in str(r.body["messages"][0]["content"])]
    assert summaries and "Part 0 of my story" in summaries[0].body["messages"][1]["content"]
    prompt = brain.llm.requests[-1].body["messages"]
    assert "Earlier in this conversation (a summary)" in prompt[0]["content"] and prompt[0]["content"].endswith(AI_DISCLOSURE)
    assert len(prompt) - 1 <= 4  # the recent window: at most agent.history_messages turns
    async with brain.db.tenant(tenant_id=brain.acme.id) as session:
        from konstruct.db.models import Conversation

        kept = await session.scalar(select(Conversation.summary).where(Conversation.person == "uma"))
    assert kept


def test_vision_is_known_per_model() -> None:
    assert supports_vision("openai/gpt-4o") is True
    assert supports_vision("openai/gpt-3.5-turbo") is False
    assert supports_vision(f"openai/unknown-{uuid.uuid4().hex[:6]}") is True  # unknown: images are passed on


def test_an_unknown_model_keeps_its_images_after_its_first_call() -> None:
    """A litellm Router registers its models in litellm's map, capabilities blank: that must not make an unknown model
    blind from its second message on (a long-running worker saw images only until the model's first call)."""
    model = f"openai/local-vision-{uuid.uuid4().hex[:6]}"
    assert supports_vision(model) is True
    litellm = load_litellm()
    litellm.Router(model_list=[{"model_name": model, "litellm_params": {"model": model, "api_base": "http://127.0.0.1:9", "api_key": "x"}}])
    assert model in litellm.model_cost  # what the Router did
    assert supports_vision(model) is True
    assert supports_vision("openai/gpt-3.5-turbo") is False  # a model the bundled map knows keeps its answer
