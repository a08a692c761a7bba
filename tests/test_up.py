"""`konstruct up` as a person runs it: the console script in the folder that holds konstruct.toml, on its own
embedded PostgreSQL. One `up` per data directory; the banner names the real address; a module in that folder
named like a library does not replace it in the parts; an edit of konstruct.toml is taken up while `up` runs."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from konstruct.cli.config_watch import ConfigWatch
from konstruct.config import Settings, _toml_value, load_settings
from konstruct.db.embedded import postmaster_pid
from konstruct.errors import ConflictError
from konstruct.supervision import LOCK_FILE, hold_up_lock, read_state, release_up_lock
from tests.conftest import write_config
from tests.fakes.llm import FakeLLM
from tests.helpers import Proc, cli_env, free_port, konstruct, konstruct_in_process, wait_for

# Each raises on import: if a part put the current folder on sys.path, it would not start.
SHADOWED = ("stripe", "huey", "litellm", "starlette")


class Up(Proc):
    """`konstruct up` through the installed console script, as a person types it, in `cwd`."""

    def __init__(self, cwd: Path, log_dir: Path, *, env: dict[str, str] | None = None) -> None:
        self.name = "up"
        self.log_path = log_dir / f"up-{time.monotonic_ns()}.log"
        self._log = self.log_path.open("w")
        script = Path(sys.executable).parent / "konstruct"
        self.process = subprocess.Popen(
            [str(script), "up"], stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env or cli_env(), cwd=cwd
        )

    def wait_for_count(self, text: str, count: int, timeout: float = 60) -> None:
        def seen() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"up exited with {self.process.returncode}:\n{self.log()}")
            return self.log().count(text) >= count

        wait_for(seen, timeout, f"{text!r} {count} times in the up log")


class Site:
    """The folder `up` runs in, its config, and the running `up`."""

    def __init__(self, root: Path, llm: FakeLLM) -> None:
        self.root = root
        # A secret nothing here uses, whose variable is missing: `up` runs, and says so at once.
        smtp: dict[str, object] = {"password": {"$env": "KONSTRUCT_TEST_UNSET_SMTP_PASSWORD"}}
        self.config = write_config(root, None, llm.url, up={"standby": True}, smtp=smtp)
        for name in SHADOWED:
            (root / f"{name}.py").write_text(f"raise RuntimeError('the current folder shadowed {name}')\n")
        self.up = Up(root, root)

    @property
    def settings(self) -> Settings:
        return load_settings(self.config)

    def edit(self, section: str, **values: Any) -> None:
        raw = tomllib.loads(self.config.read_text())
        raw.setdefault(section, {}).update(values)
        lines = []
        for name, keys in raw.items():
            lines.append(f"[{name}]")
            lines += [f"{key} = {_toml_value(value)}" for key, value in keys.items()]
        self.config.write_text("\n".join(lines) + "\n")

    def state(self) -> dict[str, Any]:
        return read_state(self.settings.data_dir) or {}

    def pids(self) -> dict[str, int]:
        return {name: part["pid"] for name, part in self.state()["parts"].items()}

    def all_running(self) -> bool:
        parts = self.state().get("parts") or {}
        return len(parts) == 3 and all(part["state"] == "running" for part in parts.values())

    def chat(self, text: str) -> dict[str, Any]:
        done = konstruct_in_process("chat", "-t", "acme", "-a", "Ava", "-m", text, "--json", config=self.config)
        assert done.returncode == 0, f"{done.stdout}{done.stderr}\n{self.up.log()[-4000:]}"
        return dict(json.loads(done.stdout))


@pytest.fixture(scope="module")
def llm() -> Iterator[FakeLLM]:
    fake = FakeLLM().start()
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, llm: FakeLLM) -> Iterator[Site]:
    site = Site(tmp_path_factory.mktemp("site"), llm)
    try:
        site.up.wait_for_log("Konstruct is up", timeout=120)
        for args in (
            ("tenant", "create", "Acme", "--slug", "acme"),
            ("agent", "create", "--tenant", "acme", "--name", "Ava", "--role", "Support", "--persona", "Brief."),
        ):
            done = konstruct_in_process(*args, config=site.config)
            assert done.returncode == 0, done.stderr
        wait_for(site.all_running, 60, "the gateway, the worker and a warm spare")
        yield site
    finally:
        data = load_settings(site.config).data_dir
        site.up.stop(signal.SIGINT, timeout=60)
        pid = postmaster_pid(data)
        if pid is not None:  # a failed run must not leave a server behind
            os.kill(pid, signal.SIGKILL)


def _readyz(port: int) -> int:
    return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code


def test_the_parts_start_while_the_database_does(site: Site) -> None:
    """The gateway and the worker are started before the embedded PostgreSQL, and held until it is migrated: their
    imports, most of their start-up, overlap the database's. (The first test of the module: no part restarted yet.)"""
    postmaster = postmaster_pid(site.settings.data_dir)
    assert postmaster is not None
    database_started = psutil.Process(postmaster).create_time()
    pids = site.pids()
    for name in ("gateway", "worker"):
        assert psutil.Process(pids[name]).create_time() < database_started, name
    assert psutil.Process(pids["standby"]).create_time() > database_started  # the spare: once the others are ready


def test_a_part_held_for_a_database_up_never_got_exits_quietly(tmp_path: Path, llm: FakeLLM) -> None:
    config = write_config(tmp_path, None, llm.url)
    for part in ("gateway", "worker"):
        done = subprocess.run(
            [sys.executable, "-m", "konstruct", "--config", str(config), part],
            env=cli_env(KONSTRUCT_UP_HELD="1"), stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert (done.returncode, done.stdout, done.stderr) == (0, "", ""), part
    assert not (tmp_path / ".konstruct" / "pg").exists()  # nothing started, not even the embedded database


def test_up_on_a_database_it_cannot_reach_leaves_no_part_behind(tmp_path: Path, llm: FakeLLM) -> None:
    config = write_config(tmp_path, f"postgresql://konstruct:secret@127.0.0.1:{free_port()}/konstruct", llm.url)
    done = konstruct("up", config=config, timeout=90)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "cannot reach the database" in done.stderr and "Traceback" not in done.stderr, done.stderr

    def left() -> list[int]:
        return [p.pid for p in psutil.process_iter(["cmdline"]) if str(config) in " ".join(p.info["cmdline"] or [])]

    wait_for(lambda: not left(), 10, "no gateway or worker of the failed up")


def test_the_banner_names_the_configured_address(site: Site) -> None:
    port = site.settings.gateway.port
    assert port != 8080
    lines = site.up.log().splitlines()
    banner = next(line for line in lines if "Konstruct is up" in line)
    assert f"gateway http://127.0.0.1:{port} " in banner, banner
    # The warm spare starts once the others are ready: its imports would otherwise slow their start-up.
    spare = next(n for n, line in enumerate(lines) if line.startswith("standby |"))
    assert lines.index(banner) < spare, "\n".join(lines[:40])
    warned = [line for line in site.up.log().splitlines() if "warning:" in line]
    assert len(warned) == 1 and "smtp.password: environment variable KONSTRUCT_TEST_UNSET_SMTP_PASSWORD is not set" in warned[0], warned
    assert site.state()["gateway"] == f"http://127.0.0.1:{port}"


def test_a_module_in_the_current_folder_does_not_shadow_a_library(site: Site) -> None:
    """stripe.py, huey.py, litellm.py and starlette.py in the folder `up` runs from: the gateway, the worker and the
    spare start all the same, and a worker the spare forks answers too."""
    assert _readyz(site.settings.gateway.port) == 200
    first = site.chat("hello there")
    assert first["status"] == "replied" and first["reply"] == "[fake-model] You said: hello there", first
    worker = site.pids()["worker"]
    os.kill(worker, signal.SIGKILL)
    # The spare says it forked on its own output, which `up` relays in its own time: waited for, not raced.
    forked = lambda: site.all_running() and site.pids()["worker"] != worker and "standby: started worker pid" in site.up.log()  # noqa: E731
    wait_for(forked, 30, "a worker forked by the spare")
    again = site.chat("and again")
    assert again["reply"] == "[fake-model] You said: and again", again
    assert "shadowed" not in site.up.log()


def test_a_second_up_on_the_same_data_directory_is_refused(site: Site) -> None:
    """Even on another port: one red line naming the running `up` and how to stop it."""
    second = konstruct("up", config=site.config, env=cli_env(KONSTRUCT_GATEWAY__PORT=str(free_port())), timeout=60)
    assert second.returncode == 1, second.stdout + second.stderr
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in second.stderr, second.stderr
    assert f"pid {site.up.process.pid}" in lines[0] and f"kill {site.up.process.pid}" in lines[0], lines
    assert str(site.settings.data_dir) in lines[0]
    assert site.up.process.poll() is None and site.all_running()


def test_no_child_of_up_holds_its_lock(site: Site) -> None:
    """The parts, the worker the spare forked and the embedded PostgreSQL: none has up.lock open, so none keeps
    the data directory locked once `up` is gone."""
    lock = str(site.settings.data_dir / LOCK_FILE)
    up = psutil.Process(site.up.process.pid)
    assert lock in [f.path for f in up.open_files()]  # the check below can see it
    postmaster = postmaster_pid(site.settings.data_dir)
    assert postmaster is not None
    others = [*up.children(recursive=True), psutil.Process(postmaster), *psutil.Process(postmaster).children(recursive=True)]
    assert len(others) >= 5
    for process in others:
        with_lock = [f.path for f in process.open_files() if f.path == lock]
        assert not with_lock, f"{process.pid} {process.cmdline()[:4]} holds {lock}"


def test_an_edit_the_worker_uses_is_taken_up(site: Site, llm: FakeLLM) -> None:
    before = site.pids()
    applied = site.up.log().count("konstruct.toml applied")
    site.edit("llm", model="openai/edited-model")
    site.up.wait_for_count("konstruct.toml applied", applied + 1, timeout=90)
    assert "konstruct.toml changed (llm.model): restarting the parts one at a time" in site.up.log()
    reply = site.chat("after the edit")
    assert reply["reply"] == "[edited-model] You said: after the edit", reply
    wait_for(site.all_running, 30, "every part running again")
    after = site.pids()
    assert all(after[name] != before[name] for name in ("gateway", "worker", "standby")), (before, after)
    wait_for(lambda: all(_gone(pid) for pid in before.values()), 30, f"the previous processes {before} to stop")


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_port_edit_moves_the_gateway(site: Site) -> None:
    old, new = site.settings.gateway.port, free_port()
    applied = site.up.log().count("konstruct.toml applied")
    site.edit("gateway", port=new, public_url=f"http://127.0.0.1:{new}")
    site.up.wait_for_count("konstruct.toml applied", applied + 1, timeout=90)
    assert f"konstruct.toml applied — gateway http://127.0.0.1:{new}" in site.up.log()
    assert _readyz(new) == 200
    wait_for(lambda: site.state()["gateway"] == f"http://127.0.0.1:{new}", 10, "up.json naming the new address")

    def old_port_closed() -> bool:
        try:
            _readyz(old)
        except httpx.ConnectError:
            return True
        return False

    wait_for(old_port_closed, 30, f"nothing listening on {old} any more")


def test_an_invalid_edit_is_told_once_and_changes_nothing(site: Site) -> None:
    wait_for(site.all_running, 30, "every part running")
    before, good = site.pids(), site.config.read_text()
    site.edit("gateway", port="eighty")
    site.up.wait_for_count("konstruct.toml changed but is not applied", 1, timeout=30)
    site.config.write_text(good + "[broken\n")
    site.up.wait_for_count("konstruct.toml changed but is not applied", 2, timeout=30)
    site.config.write_text(good)
    site.up.wait_for_count("konstruct.toml changed; no setting differs", 1, timeout=30)
    log = site.up.log()
    lines = [line for line in log.splitlines() if "not applied" in line]
    assert len(lines) == 2, lines
    assert "gateway.port" in lines[0] and "still running with the previous configuration" in lines[0], lines
    assert "not valid TOML" in lines[1], lines
    assert "Traceback" not in log
    assert site.pids() == before and _readyz(site.settings.gateway.port) == 200


def test_an_edit_only_a_restart_of_up_applies_is_named(site: Site) -> None:
    before = site.pids()
    site.edit("up", stable_after=3.0)
    site.up.wait_for_count("restart `konstruct up` to apply up.stable_after", 1, timeout=30)
    assert site.state()["config"]["needs_up_restart"] == ["up.stable_after"]
    assert site.pids() == before


def test_a_killed_up_leaves_its_data_directory_free(tmp_path: Path, database_url: str, llm: FakeLLM) -> None:
    config = write_config(tmp_path, database_url, llm.url)
    data = load_settings(config).data_dir
    up = Up(tmp_path, tmp_path)
    up.wait_for_log("Konstruct is up", timeout=90)
    state = wait_for(lambda: read_state(data), 10, "up's state file")
    pids = [part["pid"] for part in state["parts"].values() if part["pid"]]
    with pytest.raises(ConflictError, match="another `konstruct up`"):
        hold_up_lock(data)
    up.kill()  # right after ready: the worker is still warming up (CI once left such a worker hanging in its shutdown)
    fd = hold_up_lock(data)  # at once: the parts, still shutting down, never held it
    try:
        assert os.pread(fd, 32, 0).decode().strip() == str(os.getpid())
        with open(data / LOCK_FILE) as other, pytest.raises(BlockingIOError):
            fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        release_up_lock(fd)

    def running(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:  # also when it ends between the look-up and the status
            return False

    def gone() -> bool:
        return not any(running(pid) for pid in pids)

    assert len(pids) >= 2
    wait_for(gone, 40, f"the parts {pids} of the killed up to end")


def test_the_config_watch_names_what_changed_and_keeps_what_up_works_from(tmp_path: Path, llm: FakeLLM) -> None:
    """A secret is compared by value; a half-written file is read only once it stayed the same for one poll."""
    config = write_config(tmp_path, "postgresql://owner:pw@127.0.0.1:5432/konstruct", llm.url)
    old = load_settings(config)
    watch = ConfigWatch(old)
    assert watch.poll() is None
    text = config.read_text().replace('api_key = "sk-test-key-0001"', 'api_key = "sk-test-key-0002"')
    config.write_text(text + '[data]\ndir = "elsewhere"\n')
    assert watch.poll() is None  # written just now: perhaps not finished
    change = watch.poll()
    assert change is not None
    assert change.applied == ["llm.api_key"] and change.needs_restart == ["data.dir"]
    assert change.settings.data_dir == old.data_dir and change.settings.llm.api_key != old.llm.api_key
    assert watch.poll() is None  # told once
    watch.accept(change)
    os.utime(config)  # touched, not changed
    assert watch.poll() is None and watch.poll() is None
    config.write_text(config.read_text() + '[[tenants]]\nslug = "acme"\nname = "Acme"\n')
    tenants = watch.poll() or watch.poll()
    assert tenants is not None and tenants.not_for_the_parts == ["tenants"], tenants
    assert tenants.applied == [] and tenants.needs_restart == ["data.dir"]  # still waiting for a restart of `up`
