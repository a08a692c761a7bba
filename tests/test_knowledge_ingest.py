"""Knowledge ingest end to end: a small corpus (Markdown, HTML, a generated PDF, a damaged PDF, an unsupported file)
added through the CLI and ingested by a real worker with the real embedding model; idempotence, replacement,
removal, sync, URLs through web_fetch's guarded fetcher, tenants kept apart, plan/apply, and tenant deletion."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import psycopg
import pytest
from sqlalchemy import select
from sqlalchemy.engine import URL

from konstruct import audit
from konstruct.agent.agents import create_agent
from konstruct.config import load_settings
from konstruct.db.engine import Database
from konstruct.db.models import KnowledgeChunk, KnowledgeSource
from konstruct.knowledge import chunk, collect, extract
from konstruct.knowledge.ingest import measure_throughput
from konstruct.tenancy.tenants import TenantInfo, create_tenant
from tests.fakes.llm import FakeLLM
from tests.fakes.server import LoopbackServer, QuietHandler, serve, shutdown
from tests.helpers import konstruct_in_process, wait_until
from tests.shared import SharedWorker, shared_worker, unique_slug

GUIDE = """# Returns

Anything bought from Acme can be returned within 30 days, unopened, with its receipt.

## Damaged items

A kettle that arrives damaged is replaced free of charge. Send a photo of the damage to support.

## Refunds

Refunds reach the original card within five working days of the return being received.

# Shipping

Orders placed before noon ship the same day from our Porto warehouse.
"""


def make_pdf(pages: list[list[str]]) -> bytes:
    """A minimal valid PDF (Helvetica text, one content stream per page) with a correct cross-reference table."""
    kids = " ".join(f"{4 + 2 * i} 0 R" for i in range(len(pages)))
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", f"<< /Type /Pages /Kids [{kids}] /Count {len(pages)} >>".encode(),
               b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]  # fmt: skip
    for i, lines in enumerate(pages):
        ops = "BT /F1 12 Tf 72 720 Td 14 TL " + " ".join(f"({line}) '" for line in lines) + " ET"
        objects.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 3 0 R >> >> "
                       f"/Contents {5 + 2 * i} 0 R >>".encode())  # fmt: skip
        objects.append(f"<< /Length {len(ops)} >>\nstream\n{ops}\nendstream".encode())
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for n, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += f"{n} 0 obj\n".encode() + body + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode() + b"".join(f"{o:010d} 00000 n \n".encode() for o in offsets)
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return bytes(out)


def write_corpus(root: Path) -> Path:
    corpus = root / "corpus"
    (corpus / "drafts").mkdir(parents=True)
    (corpus / "guide.md").write_text(GUIDE)
    (corpus / "hours.html").write_text(
        "<html><head><title>Opening hours</title><style>p{color:red}</style></head><body><nav>Home | Shop</nav>"
        "<h1>Opening hours</h1><p>The Porto shop opens Monday to Friday, 9 to 17.</p><script>track()</script>"
        "<h2>Holidays</h2><p>Closed on 25 December.</p></body></html>"
    )
    (corpus / "warranty.pdf").write_bytes(make_pdf([["Warranty", "Every kettle carries a two year warranty."], ["Batteries excluded."]]))
    (corpus / "broken.pdf").write_bytes(b"%PDF-1.4\nthis is not really a pdf")
    (corpus / "notes.docx").write_bytes(b"PK\x03\x04 word file")
    (corpus / "drafts" / "secret.md").write_text("# Secret\n\nNot for customers.")
    return corpus


@dataclass
class Site:
    config: Path
    database_url: str
    db: Database
    acme: TenantInfo
    globex: TenantInfo

    def cli(self, *args: str) -> Any:
        return konstruct_in_process(*(self.slug(a) for a in args), config=self.config)

    def slug(self, name: str) -> str:
        return {"acme": self.acme.slug, "globex": self.globex.slug}.get(name, name)

    def add(self, *args: str, tenant: str = "acme") -> dict[str, Any]:
        result = self.cli("knowledge", "add", "--tenant", tenant, "--json", "--timeout", "120", *args)
        assert result.returncode == 0, result.stderr + result.stdout
        return dict(json.loads(result.stdout))

    async def chunks(self, tenant: TenantInfo) -> list[tuple[str, KnowledgeChunk]]:
        async with self.db.tenant(tenant_id=tenant.id) as session:
            rows = await session.execute(
                select(KnowledgeSource.name, KnowledgeChunk)
                .join(KnowledgeSource, KnowledgeSource.id == KnowledgeChunk.source_id)
                .order_by(KnowledgeSource.name, KnowledgeChunk.ordinal)
            )
            return [(name, c) for name, c in rows]


def outcomes(report: dict[str, Any]) -> dict[str, str]:
    return {r["name"]: r["status"] for r in report["results"]}


@pytest.fixture(scope="module")
def worker(pg_server: URL, template_db: str, fake_llm_server: FakeLLM, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SharedWorker]:
    with shared_worker(pg_server, template_db, tmp_path_factory.mktemp("knowledge"), fake_llm_server.url,
                       agent={"web_fetch_private_networks": ["127.0.0.1/32"]}) as shared:  # fmt: skip
        yield shared


@pytest.fixture
async def site(worker: SharedWorker) -> AsyncIterator[Site]:
    db = Database(load_settings(worker.config))
    try:
        acme = await create_tenant(db, name="Acme", slug=unique_slug("acme"), actor="test")
        globex = await create_tenant(db, name="Globex", slug=unique_slug("globex"), actor="test")
        for tenant in (acme, globex):
            await create_agent(db, tenant, name="Ava", role="Support", persona="Helpful.", model=None, actor="test")
        yield Site(worker.config, worker.database_url, db, acme, globex)
    finally:
        await db.dispose()


async def test_a_corpus_is_ingested_idempotently_replaced_removed_and_synced(site: Site, tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path)
    report = site.add(str(corpus), "--exclude", "drafts/*")
    assert outcomes(report) == {"corpus/guide.md": "added", "corpus/hours.html": "added", "corpus/warranty.pdf": "added",
                                "corpus/broken.pdf": "failed", "corpus/notes.docx": "skipped"}  # fmt: skip
    why = {r["name"]: r["error"] for r in report["results"]}
    assert why["corpus/broken.pdf"].startswith("not a readable PDF") and "not a type Konstruct reads (.docx" in why["corpus/notes.docx"]
    stored = await site.chunks(site.acme)
    headings = {(name, c.heading): c.content for name, c in stored}
    # Chunk boundaries follow the headings, and each chunk keeps its heading path.
    assert headings[("corpus/guide.md", "Returns > Damaged items")].startswith("A kettle that arrives damaged")
    assert "Refunds reach" not in headings[("corpus/guide.md", "Returns > Damaged items")]
    assert headings[("corpus/guide.md", "Shipping")] == "Orders placed before noon ship the same day from our Porto warehouse."
    assert headings[("corpus/hours.html", "Opening hours > Holidays")] == "Closed on 25 December."
    assert "track()" not in str(headings) and "Home | Shop" not in str(headings) and "Secret" not in str(headings)
    assert headings[("corpus/warranty.pdf", "page 1")] == "Warranty\nEvery kettle carries a two year warranty."
    assert all(len(c.embedding) == 384 for _, c in stored)
    listed = json.loads(site.cli("knowledge", "list", "--tenant", "acme", "--json").stdout)
    assert {s["name"]: s["status"] for s in listed}["corpus/broken.pdf"] == "failed"

    again = site.add(str(corpus), "--exclude", "drafts/*")  # unchanged: nothing rewritten
    assert set(outcomes(again).values()) == {"unchanged", "failed", "skipped"} and outcomes(again)["corpus/guide.md"] == "unchanged"
    assert [c.id for _, c in await site.chunks(site.acme)] == [c.id for _, c in stored]

    (corpus / "guide.md").write_text(GUIDE.replace("five working days", "three working days"))
    changed = site.add(str(corpus / "guide.md"))  # the same file (same uri) added on its own
    assert outcomes(changed) == {"guide.md": "replaced"}
    now = await site.chunks(site.acme)
    guide = [c for name, c in now if name == "guide.md"]
    assert any("three working days" in c.content for c in guide) and not any("five working days" in c.content for _, c in now)
    assert {c.id for c in guide}.isdisjoint(c.id for _, c in stored)

    removed = site.cli("knowledge", "remove", str(corpus / "hours.html"), "--tenant", "acme", "--yes", "--json")
    assert removed.returncode == 0, removed.stderr
    assert not any(name == "corpus/hours.html" for name, _ in await site.chunks(site.acme))

    (corpus / "warranty.pdf").unlink()
    synced = site.cli("knowledge", "sync", "--tenant", "acme", "--json", "--timeout", "120")
    assert synced.returncode == 0, synced.stderr
    assert outcomes(json.loads(synced.stdout)) == {"guide.md": "unchanged", "corpus/warranty.pdf": "removed", "corpus/broken.pdf": "failed"}
    assert {name for name, _ in await site.chunks(site.acme)} == {"guide.md"}
    actions = [e.action for e in await audit.events(site.db, site.acme.id)]
    assert {"knowledge.add.queued", "knowledge.stored", "knowledge.failed", "knowledge.removed", "knowledge.sync.queued"} <= set(actions)


async def test_the_other_tenants_identical_document_is_its_own_and_goes_with_it(site: Site, tmp_path: Path) -> None:
    (tmp_path / "guide.md").write_text(GUIDE)
    for tenant in ("acme", "globex"):
        assert outcomes(site.add(str(tmp_path / "guide.md"), tenant=tenant)) == {"guide.md": "added"}  # not "unchanged"
    acme, globex = await site.chunks(site.acme), await site.chunks(site.globex)
    assert [c.content for _, c in acme] == [c.content for _, c in globex]
    assert {c.tenant_id for _, c in acme} == {site.acme.id} and {c.tenant_id for _, c in globex} == {site.globex.id}
    assert site.cli("knowledge", "remove", "guide.md", "--tenant", "globex", "--yes").returncode == 0
    assert len(await site.chunks(site.acme)) == len(acme)  # the other tenant's removal leaves acme's alone

    deleted = site.cli("tenant", "delete", "acme", "--yes")
    assert deleted.returncode == 0, deleted.stderr
    with psycopg.connect(site.database_url) as conn:  # the owner, past row-level security
        for table in ("knowledge_sources", "knowledge_chunks", "knowledge_jobs"):
            row = conn.execute(f"SELECT count(*) FROM {table} WHERE tenant_id = %s", (site.acme.id,)).fetchone()
            assert row == (0,), table


class Pages(QuietHandler):
    gone: ClassVar[set[str]] = set()  # paths that answer 404 (a page taken down)

    def do_GET(self) -> None:
        if self.path in self.gone:
            self.send_bytes(404, "text/plain", b"not found")
        elif self.path == "/manual.pdf":
            self.send_bytes(200, "application/pdf", make_pdf([["Descaling: use vinegar once a month."]]))
        else:
            self.send_bytes(200, "text/html; charset=utf-8", b"<title>FAQ</title><h1>FAQ</h1><p>We ship to Portugal and Spain.</p>")


@pytest.fixture(scope="module")
def pages() -> Iterator[LoopbackServer]:
    server = serve(Pages, 0, "knowledge-pages")
    yield server
    shutdown(server)


async def test_urls_come_through_the_guarded_fetcher(site: Site, pages: LoopbackServer) -> None:
    base = f"http://127.0.0.1:{pages.server_address[1]}"
    not_listed = site.add(f"{base}/faq")
    assert not_listed["results"][0]["status"] == "failed" and "not on this workspace's web allow-list" in not_listed["results"][0]["error"]
    assert site.cli("tenant", "configure", "acme", "--allowed-hosts", "127.0.0.1,10.0.0.1").returncode == 0
    report = site.add(f"{base}/faq#top", f"{base}/manual.pdf", "http://10.0.0.1/admin")
    by_uri = {r["uri"]: r for r in report["results"]}
    assert by_uri[f"{base}/faq"]["status"] == "added" and by_uri[f"{base}/faq"]["name"] == "FAQ"
    assert by_uri[f"{base}/manual.pdf"]["status"] == "added"
    assert "10.0.0.1 resolves to a private or reserved address" in by_uri["http://10.0.0.1/admin"]["error"]
    contents = {c.content for _, c in await site.chunks(site.acme)}
    assert {"We ship to Portugal and Spain.", "Descaling: use vinegar once a month."} <= contents

    Pages.gone.add("/faq")
    try:
        synced = json.loads(site.cli("knowledge", "sync", "--tenant", "acme", "--json", "--timeout", "120").stdout)
    finally:
        Pages.gone.clear()
    assert {r["uri"]: r["status"] for r in synced["results"]}[f"{base}/faq"] == "removed"
    assert {c.content for _, c in await site.chunks(site.acme)} == {"Descaling: use vinegar once a month."}


async def test_jobs_no_wait_mistakes_and_agents(site: Site, tmp_path: Path) -> None:
    (tmp_path / "a.md").write_text("# A\n\nAlpha.")
    queued = site.cli("knowledge", "add", "--tenant", "acme", "--agent", "Ava", "--no-wait", "--json", str(tmp_path / "a.md"))
    assert queued.returncode == 0, queued.stderr
    job_id = json.loads(queued.stdout)[0]["id"]

    async def finished() -> bool:
        job = json.loads(site.cli("knowledge", "job", job_id, "--tenant", "acme", "--json").stdout)
        return bool(job["status"] == "done")

    await wait_until(finished, bool, 120, "the job done")
    jobs = json.loads(site.cli("knowledge", "jobs", "--tenant", "acme", "--json").stdout)
    assert jobs[0]["id"] == job_id and jobs[0]["counts"] == {"added": 1} and jobs[0]["total"] == jobs[0]["done"] == 1
    listed = json.loads(site.cli("knowledge", "list", "--tenant", "acme", "--json").stdout)
    async with site.db.tenant(tenant_id=site.acme.id) as session:
        ava = await session.scalar(select(KnowledgeSource.agent_ids))
    assert listed[0]["agent_ids"] == [str(a) for a in ava or []] and len(ava or []) == 1
    shown = site.cli("knowledge", "show", "a.md", "--tenant", "acme")
    assert shown.returncode == 0 and "Alpha." in shown.stdout
    (tmp_path / "b.txt").write_text("Beta paragraph.")
    plain = site.cli("knowledge", "add", "--tenant", "acme", "--agent", "Ava", str(tmp_path / "a.md"), str(tmp_path / "b.txt"))
    assert plain.returncode == 0 and "2 sources: 1 unchanged, 1 added; 1 chunks stored" in plain.stdout, plain.stdout + plain.stderr
    for command, seen in (("list", "b.txt"), ("jobs", job_id)):
        table = site.cli("knowledge", command, "--tenant", "acme")
        assert table.returncode == 0 and seen in table.stdout, table.stdout

    for args, words in [
        (["add", "--tenant", "acme", str(tmp_path / "missing.md")], "no such file or folder"),
        (["add", "--tenant", "acme", "--agent", "Bob", str(tmp_path / "a.md")], "has no agent 'Bob'"),
        (["add", "--tenant", "acme", "ftp://example.com/x"], "no such file or folder"),
        (["show", "nothing.md", "--tenant", "acme"], "has no knowledge source 'nothing.md'"),
        (["job", "not-an-id", "--tenant", "acme"], "is not a job id"),
        (["job", str(uuid.uuid4()), "--tenant", "acme"], "has no knowledge job"),
    ]:
        result = site.cli("knowledge", *args)
        assert result.returncode == 1 and words in result.stderr and "Traceback" not in result.stderr, (args, result.stderr)


async def test_knowledge_is_declared_in_plan_and_apply(site: Site, tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "faq.md").write_text("# FAQ\n\nWe answer within a day.")
    declared = tmp_path / "tenants.toml"
    declared.write_text(f'[[tenants]]\nslug = "{site.acme.slug}"\nname = "Acme"\n\n'
                        '[[tenants.knowledge]]\npath = "docs"\nagents = ["Ava"]\n')  # fmt: skip
    plan = json.loads(site.cli("plan", "--file", str(declared), "--json").stdout)
    assert [(c["action"], c["kind"], c["fields"]) for c in plan] == [("create", "knowledge", {"sources": {"now": None, "then": 1}})]
    applied = site.cli("apply", "--file", str(declared), "--json")
    assert applied.returncode == 0, applied.stderr
    job_id = json.loads(applied.stdout)["knowledge_jobs"][0]["id"]
    await wait_until(lambda: site.chunks(site.acme), bool, 120, f"job {job_id} stored")
    assert json.loads(site.cli("plan", "--file", str(declared), "--json").stdout) == []
    pruned = json.loads(site.cli("plan", "--file", str(declared), "--prune", "--json").stdout)
    assert all(c["kind"] != "knowledge" for c in pruned)


def test_headings_split_and_overlap() -> None:
    long = " ".join(f"Sentence number {n} about descaling kettles." for n in range(60))
    chunks = chunk.split("markdown", f"# Care\n\n{long}\n\n```\n# not a heading\n```\n\n## Storage\n\nKeep it dry.")
    care = [c for c in chunks if c.heading == "Care"]
    assert len(care) >= 3 and all(len(c.content) <= chunk.TARGET + chunk.OVERLAP for c in care)
    assert care[1].content.split(" ")[0:3] != care[0].content.split(" ")[0:3]
    tail = care[0].content.rsplit(". ", 1)[-1]
    assert care[1].content.startswith(tail.split(" ")[0]) and tail in care[1].content  # overlap: the next begins with the last sentence
    assert "# not a heading" in care[-1].content and chunks[-1] == chunk.Chunk("Care > Storage", "Keep it dry.")
    assert extract.kind_for("notes.MD") == "markdown" and extract.kind_for("x", "application/pdf; q=1") == "pdf"


async def test_throughput_is_measured_on_a_real_corpus(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path)
    figures = await measure_throughput([corpus / "guide.md", corpus / "hours.html"])
    assert figures.files == 2 and figures.chunks == 6 and figures.chunks_per_second > 0
    assert figures.as_json()["chunks"] == 6


def test_folders_are_walked_with_patterns_and_large_adds_split_into_jobs(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path)
    (corpus / ".git").mkdir()
    (corpus / ".git" / "HEAD.md").write_text("# hidden")
    found = collect.collect([str(corpus)], include=["*.md", "*.html"], exclude=["drafts/*"])
    assert [i["name"] for i in found.items] == ["corpus/guide.md", "corpus/hours.html"] and found.skipped == []
    everything = collect.collect([str(corpus)])
    assert {s["name"] for s in everything.skipped} == {"corpus/notes.docx"} and len(everything.items) == 5
    groups = collect.batches(everything.items, limit=400)  # bytes of files per job
    assert [i["name"] for g in groups for i in g] == [i["name"] for i in everything.items] and len(groups) > 1
    assert all(sum(collect.item_bytes(i) for i in g) <= 400 or len(g) == 1 for g in groups)


def chat(site: Site, tenant: str, text: str) -> str:
    result = site.cli("chat", "--tenant", tenant, "--agent", "Ava", "--new", "--message", text, "--json", "--timeout", "60")
    assert result.returncode == 0, result.stderr + result.stdout
    return str(json.loads(result.stdout)["reply"])


def prompt_with(fake: FakeLLM, text: str) -> str:
    """The system prompt of the last request the model got for a message."""
    for recorded in reversed(fake.requests):
        messages = recorded.body.get("messages", [])
        if any(m.get("role") == "user" and text in str(m.get("content")) for m in messages):
            return str(messages[0]["content"])
    raise AssertionError(f"the model never got {text!r}")


async def test_answers_come_from_the_tenants_own_documents_and_name_their_sources(
    site: Site, tmp_path: Path, fake_llm_server: FakeLLM
) -> None:
    for tenant, guide in (("acme", GUIDE), ("globex", GUIDE.replace("five working days", "eleven working days"))):
        (tmp_path / tenant).mkdir()
        (tmp_path / tenant / "guide.md").write_text(guide)  # the same name, headings and layout in both tenants
        assert outcomes(site.add(str(tmp_path / tenant / "guide.md"), tenant=tenant)) == {"guide.md": "added"}

    question = "How long until a refund reaches my card?"
    reply = chat(site, "acme", question)
    system = prompt_with(fake_llm_server, question)
    assert "Source: guide.md — Returns > Refunds\nRefunds reach the original card within five working days" in system
    assert "eleven" not in system and "say that the documents do not cover it" in system and "[guide.md]" in system
    assert reply.endswith("[guide.md]\n\nSources: guide.md")  # the model cited it: the answer names its source
    assert chat(site, "globex", question).endswith("Sources: guide.md")
    assert "eleven working days" in prompt_with(fake_llm_server, question) and "five working days" not in prompt_with(
        fake_llm_server, question
    )

    # The model may search again: knowledge_search is offered once the agent has documents.
    searched = chat(site, "acme", '[[call knowledge_search {"query": "Porto warehouse noon"}]]')
    assert "Tool said: Source: guide.md — Shipping\nOrders placed before noon ship the same day" in searched

    # `knowledge search` shows what retrieval would put in the prompt, with its scores.
    dry = site.cli("knowledge", "search", "--tenant", "acme", "--agent", "Ava", question, "--json")
    assert dry.returncode == 0, dry.stderr
    found = json.loads(dry.stdout)
    assert found["method"] == "exact" and found["scope_chunks"] >= 4 and found["passages"][0]["heading"] == "Returns > Refunds"
    assert all(p["score"] > 0 and p["source"] == "guide.md" for p in found["passages"])
    table = site.cli("knowledge", "search", "--tenant", "acme", "--agent", "Ava", "refund card")
    assert table.returncode == 0 and "Returns > Refunds" in table.stdout and "score" in table.stdout
    missing = site.cli("knowledge", "search", "--tenant", "acme", "--agent", "Nobody", "refund")
    assert missing.returncode == 1 and "Nobody" in missing.stderr and "Traceback" not in missing.stderr
