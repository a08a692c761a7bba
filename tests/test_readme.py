"""The README's quick start, run literally in a fresh folder: its commands are parsed from README.md itself (the first
```bash block under "## Quick start"), so the README and this test cannot drift apart.

The model is the fake LLM, reached only through the environment, as a person's shell would have it: litellm's openai/
provider takes its base URL from OPENAI_BASE_URL when no `api_base` is configured, which the quick start does not. The
gateway's port comes from KONSTRUCT_GATEWAY__PORT (the default 8080 may be taken on a test machine). The database is
the embedded default, under the fresh folder.
"""

from __future__ import annotations

import re
import shlex
import signal
import subprocess
import time
from pathlib import Path

import httpx
import psutil

from tests.fakes.llm import FakeLLM
from tests.helpers import Proc, cli_env, free_port, konstruct, wait_for

README = Path(__file__).resolve().parent.parent / "README.md"


def quick_start_commands(readme: str) -> list[list[str]]:
    """The commands of the first ```bash block after the "## Quick start" heading, as argv lists: lines joined at a
    trailing backslash, `# comments` dropped, words split as a POSIX shell splits them."""
    heading = re.search(r"^## Quick start\s*$", readme, re.MULTILINE)
    assert heading, "README.md has no '## Quick start' heading"
    block = re.search(r"^```bash\n(.*?)^```", readme[heading.end() :], re.MULTILINE | re.DOTALL)
    assert block, "README.md's quick start has no ```bash block"
    joined = re.sub(r"\\\n", " ", block[1])
    return [words for line in joined.splitlines() if (words := shlex.split(line, comments=True))]


def test_quick_start_parser_joins_continuations_and_drops_comments() -> None:
    readme = (
        "# X\n\n```bash\nnot this\n```\n\n## Quick start\n\nProse.\n\n```bash\n"
        "export A=1 B='two words'   # a comment\n"
        "# a whole-line comment\n"
        'konstruct agent create --name Ava \\\n    --persona "It\'s # not a comment"\n'
        "```\n\n```bash\nnor this\n```\n"
    )
    assert quick_start_commands(readme) == [
        ["export", "A=1", "B=two words"],
        ["konstruct", "agent", "create", "--name", "Ava", "--persona", "It's # not a comment"],
    ]


def option(words: list[str], name: str) -> str:
    """The value after `name` in an argv list."""
    assert name in words, f"{name} not in {shlex.join(words)}"
    return words[words.index(name) + 1]


def leftovers(site: Path, pids: set[int]) -> list[str]:
    """Processes still alive that `up` started (`pids`) or that run on the folder (the embedded PostgreSQL's data
    directory is in their command line)."""
    alive = []
    for process in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            cmdline = " ".join(process.info["cmdline"] or [])
            if process.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if process.pid in pids or (str(site) in cmdline and process.pid != psutil.Process().pid):
                alive.append(f"{process.pid} {cmdline}")
        except psutil.Error:
            continue
    return alive


def test_readme_quick_start_runs_literally_in_a_fresh_folder(tmp_path: Path, fake_llm: FakeLLM) -> None:
    commands = quick_start_commands(README.read_text(encoding="utf-8"))
    assert [c[:2] for c in commands if c[0] == "konstruct"][:2] == [["konstruct", "init"], ["konstruct", "up"]], commands
    site = tmp_path / "site"
    site.mkdir()
    port = free_port()
    env = cli_env(OPENAI_BASE_URL=fake_llm.url, KONSTRUCT_GATEWAY__PORT=str(port))
    env.pop("OPENAI_API_BASE", None)
    up: Proc | None = None
    started: float | None = None
    answered: float | None = None
    children: set[int] = set()
    code: int | None = None
    timings: list[str] = []
    try:
        for words in commands:
            if words[0] == "export":
                env.update(assignment.partition("=")[::2] for assignment in words[1:])
                continue
            assert words[0] == "konstruct", f"the quick start runs only `export` and `konstruct` here: {shlex.join(words)}"
            args = words[1:]
            began = time.monotonic()
            if args[0] == "init":
                started = time.monotonic()
            if args == ["up"]:
                up = Proc("up", args, config=None, log_dir=tmp_path, env=env, cwd=site)
                wait_ready(up, port)
                timings.append(f"{time.monotonic() - began:5.1f} s  konstruct up (until it says it is up)")
                children = {child.pid for child in psutil.Process(up.process.pid).children(recursive=True)}
                continue
            result = konstruct(*args, env=env, cwd=site, timeout=120)
            timings.append(f"{time.monotonic() - began:5.1f} s  {shlex.join(words)[:70]}")
            assert result.returncode == 0, f"{shlex.join(words)} exited {result.returncode}:\n{result.stdout}{result.stderr}"
            if args[0] == "chat" and "--message" in args:
                check_answer(result, fake_llm, message=option(args, "--message"), key=env.get("OPENAI_API_KEY", ""))
                answered = answered or time.monotonic()
        assert up is not None and started is not None and answered is not None, "the quick start never got an answer"
        print(f"\nREADME quick start: {len(commands)} commands, {answered - started:.1f} s from `konstruct init` to the first answer")
        print(*timings, sep="\n")
    finally:
        if up is not None:
            code = up.stop(signal.SIGINT, timeout=60)
    assert up is not None
    assert code == 0, up.log()
    wait_for(lambda: not leftovers(site, children), 15, "every process of `up` to be gone")
    assert not list((site / ".konstruct").rglob("*.pid")), "pid files left behind"


def wait_ready(up: Proc, port: int) -> None:
    """Until `up` says it is up (what a reader of the quick start waits for before the 2nd terminal: every part ready,
    the worker included) and the gateway's /readyz answers 200 (the database and the queue reachable), failing if `up`
    dies first."""

    def ready() -> bool:
        if up.process.poll() is not None:
            raise AssertionError(f"konstruct up exited with {up.process.returncode}:\n{up.log()}")
        if "Konstruct is up" not in up.log():
            return False
        try:
            return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(ready, 120, f"`up` to say it is up and /readyz on port {port}", interval=0.2)


def check_answer(result: subprocess.CompletedProcess[str], fake_llm: FakeLLM, *, message: str, key: str) -> None:
    """The chat printed exactly the fake model's answer to `message`, asked with the key the quick start exported."""
    asked = [r for r in fake_llm.requests if r.body.get("messages") and r.body["messages"][-1].get("content") == message]
    assert asked, f"the fake LLM was never asked {message!r}: {[r.body for r in fake_llm.requests]}"
    assert result.stdout.strip() == FakeLLM.reply_for(asked[-1].body), result.stdout + result.stderr
    assert asked[-1].headers["authorization"] == f"Bearer {key}"
