"""The deployment examples (examples/deploy) hold together: read offline, without Docker or systemd.

compose.yaml has the services the README promises, every variable it uses is in .env.example, the systemd
units parse and stop workers gracefully, every `konstruct` command named exists, and every KONSTRUCT_*
variable is a real setting that loads with the example values.
"""

from __future__ import annotations

import configparser
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import typer.main
from cryptography.fernet import Fernet
from pydantic import BaseModel

from konstruct.cli import app
from konstruct.config import CONFIG_ENV, Settings, load_settings
from konstruct.secrets import fernet
from tests.helpers import konstruct

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "examples" / "deploy"
SYSTEMD = DEPLOY / "systemd"
SHARED_TOML = DEPLOY / "konstruct.example.toml"

VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")
SETTING_NAME = re.compile(r"\bKONSTRUCT_[A-Z0-9_]*[A-Z0-9]\b")
ASSIGNMENT = re.compile(r"^(#\s*)?([A-Z][A-Z0-9_]*)=(.*)$")


# -- helpers ----------------------------------------------------------------------------------------


def env_file(path: Path, *, commented: bool = False) -> dict[str, str]:
    """KEY=value lines of an env file; with commented, also the `# KEY=value` examples."""
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        match = ASSIGNMENT.match(line.strip())
        if match and (commented or not match.group(1)):
            values[match.group(2)] = match.group(3)
    return values


def seconds(value: str) -> float:
    """A Compose or systemd duration: 300, 300s, 5m, 5min, 1m30s."""
    units = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value.strip())
    assert parts, f"not a duration: {value!r}"
    return sum(float(number) * units[unit] for number, unit in parts)


def worker_grace(settings: Settings) -> float:
    """How long a worker may take to finish after SIGINT (konstruct.worker.main.run_worker)."""
    return settings.llm.timeout * (settings.llm.retries + 1) + 5


def clean_environment(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    for name in list(os.environ):
        if name.startswith("KONSTRUCT_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)


def unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",), comment_prefixes=("#", ";"))
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys are case-sensitive
    parser.read_string(path.read_text(encoding="utf-8"), source=str(path))
    return parser


def units() -> dict[str, configparser.ConfigParser]:
    return {path.name: unit(path) for path in sorted([*SYSTEMD.glob("*.service"), *SYSTEMD.glob("*.target")])}


def words(value: str) -> list[str]:
    return value.split()


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    yaml = pytest.importorskip("yaml")
    data = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert isinstance(data, dict)
    return data


def konstruct_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in compose["services"].items() if (svc.get("command") or [None])[0] == "konstruct"}


def interpolated(value: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:?message}, ${VAR:-default} as `docker compose` would resolve them."""

    def one(match: re.Match[str]) -> str:
        name, op, arg = match.group(1), match.group(2), match.group(3)
        if env.get(name):
            return env[name]
        if op in (":-", "-"):
            return arg
        raise AssertionError(f"compose.yaml needs {name}, which is empty")

    return VARIABLE.sub(one, value)


def filled_dotenv() -> dict[str, str]:
    """.env.example as an operator fills it in: the required empty values given."""
    env = env_file(DEPLOY / ".env.example")
    generated = {
        "POSTGRES_PASSWORD": "0f3a9c1d2e4b5a6978877665",
        "KONSTRUCT_DATABASE__APP_PASSWORD": "a1b2c3d4e5f60718293a4b5c",
        "KONSTRUCT_SECRET_KEY": Fernet.generate_key().decode(),
    }
    for name, value in env.items():
        if not value:
            assert name in generated, f".env.example leaves {name} empty and the test does not know how to fill it"
            env[name] = generated[name]
    return env


# -- compose.yaml ---------------------------------------------------------------------------------------


def test_compose_has_postgres_with_pgvector_and_redis(compose: dict[str, Any]) -> None:
    services = compose["services"]
    postgres = services["postgres"]
    assert postgres["image"].startswith("pgvector/pgvector:pg1"), postgres["image"]
    assert any(str(v).endswith(":/var/lib/postgresql/data") for v in postgres["volumes"])
    assert "pg_isready" in postgres["healthcheck"]["test"]
    redis = services["redis"]
    assert redis["image"].startswith("redis:7")
    assert "redis-cli" in " ".join(redis["healthcheck"]["test"])
    declared = set(compose["volumes"])
    for svc in services.values():
        for volume in svc.get("volumes", []):
            if isinstance(volume, str) and not volume.startswith((".", "/")):
                assert volume.split(":")[0] in declared, f"volume {volume} is not declared"


def test_compose_konstruct_services_share_one_image_built_from_the_repository(compose: dict[str, Any]) -> None:
    services = konstruct_services(compose)
    assert len(services) >= 5
    for name, svc in services.items():
        context = (DEPLOY / svc["build"]["context"]).resolve()
        assert context == ROOT, name
        assert (context / svc["build"]["dockerfile"]).is_file(), name
        assert svc["image"] == "konstruct:local", name
        assert svc["env_file"] == ".env", name
        mounts = [v for v in svc["volumes"] if isinstance(v, dict)]
        config = next(m for m in mounts if m["target"] == svc["environment"][CONFIG_ENV])
        assert config["read_only"] and config["source"] == "./konstruct.toml", name


def test_compose_migrates_once_before_gateways_and_workers(compose: dict[str, Any]) -> None:
    services = compose["services"]
    migrate = services["migrate"]
    assert migrate["command"] == ["konstruct", "db", "upgrade"]
    assert migrate["restart"] == "no"
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name, svc in konstruct_services(compose).items():
        if name == "migrate":
            continue
        assert svc["depends_on"]["migrate"]["condition"] == "service_completed_successfully", name
        assert svc["depends_on"]["redis"]["condition"] == "service_healthy", name


def test_compose_gateways_are_checked_on_readyz_and_balanced_by_the_proxy(compose: dict[str, Any]) -> None:
    gateways = {name: svc for name, svc in konstruct_services(compose).items() if svc["command"] == ["konstruct", "gateway"]}
    assert len(gateways) >= 2
    caddyfile = (DEPLOY / "Caddyfile").read_text()
    upstreams = re.search(r"reverse_proxy ([^{]+)\{", caddyfile)
    assert upstreams is not None
    port = None
    for name, svc in gateways.items():
        port = svc["environment"]["KONSTRUCT_GATEWAY__PORT"]
        test = " ".join(svc["healthcheck"]["test"])
        assert f"http://127.0.0.1:{port}/readyz" in test and "urllib" in test and "curl" not in test, name
        assert f"{name}:{port}" in upstreams.group(1).split(), f"the Caddyfile does not balance to {name}"
    assert len(upstreams.group(1).split()) == len(gateways)
    assert re.search(r"^\s*health_uri /readyz$", caddyfile, re.M)
    assert "lb_try_duration" in caddyfile

    proxy = compose["services"]["proxy"]
    assert proxy["image"].startswith("caddy:2")
    assert "./Caddyfile:/etc/caddy/Caddyfile:ro" in proxy["volumes"]
    assert set(proxy["depends_on"]) == set(gateways)
    for placeholder in re.findall(r"\{\$([A-Z_]+)\}", caddyfile):
        assert placeholder in proxy["environment"], f"the Caddyfile uses {placeholder}, which the proxy does not get"


def test_compose_workers_stop_gracefully_and_exactly_one_schedules(compose: dict[str, Any]) -> None:
    settings = load_settings(SHARED_TOML)
    workers = {name: svc for name, svc in konstruct_services(compose).items() if svc["command"][:2] == ["konstruct", "worker"]}
    assert len(workers) >= 2
    for name, svc in workers.items():
        assert svc["stop_signal"] == "SIGINT", name
        assert seconds(svc["stop_grace_period"]) > worker_grace(settings) + 30, name
    schedulers = [name for name, svc in workers.items() if "--no-periodic" not in svc["command"]]
    assert schedulers == ["worker-scheduler"]
    assert "deploy" not in workers["worker-scheduler"]
    assert workers["worker"]["deploy"]["replicas"] == 3
    for name, svc in konstruct_services(compose).items():
        if name not in workers:
            assert svc.get("stop_signal", "SIGTERM") == "SIGTERM", name  # gateways and migrate: the default


def test_every_compose_variable_is_in_env_example() -> None:
    text = (DEPLOY / "compose.yaml").read_text()
    used = {match.group(1) for match in VARIABLE.finditer(text)}
    assert {"POSTGRES_PASSWORD", "KONSTRUCT_SECRET_KEY", "KONSTRUCT_DATABASE__APP_PASSWORD", "DOMAIN"} <= used
    assert not re.search(r"\$(?![{$])", text), "a bare $VAR: write ${VAR}"
    example = env_file(DEPLOY / ".env.example")
    assert used <= set(example), f"missing from .env.example: {sorted(used - set(example))}"
    secrets_ = {name for name in used if "PASSWORD" in name or "SECRET" in name}
    assert all(example[name] == "" for name in secrets_), "required secrets stay empty in .env.example, so compose refuses to start"
    assert {".env", "konstruct.toml"} <= set((DEPLOY / ".gitignore").read_text().split())


def test_compose_environment_loads_as_settings(compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    dotenv = filled_dotenv()
    for name, svc in konstruct_services(compose).items():
        env = dict(dotenv)  # env_file: .env, then `environment:` over it
        env.update({key: interpolated(str(value), dotenv) for key, value in svc["environment"].items()})
        clean_environment(monkeypatch, env)
        settings = load_settings(SHARED_TOML)  # compose mounts a copy of it at $KONSTRUCT_CONFIG
        assert settings.database.url is not None and settings.database.app_password is not None
        assert settings.database.url.get_secret_value() == f"postgresql://konstruct:{dotenv['POSTGRES_PASSWORD']}@postgres:5432/konstruct"
        assert settings.database.app_password.get_secret_value() == dotenv["KONSTRUCT_DATABASE__APP_PASSWORD"]
        assert settings.queue.url == "redis://redis:6379/0"
        assert (settings.gateway.host, settings.gateway.port) == ("0.0.0.0", 8080)
        assert settings.gateway.public_url == f"https://{dotenv['DOMAIN']}"
        assert str(settings.data_dir) == "/data"
        assert fernet(settings).decrypt(fernet(settings).encrypt(b"x")) == b"x", name
        assert settings.llm.api_key is not None, name


# -- systemd -----------------------------------------------------------------------------------------


def test_systemd_units_parse_and_run_konstruct_hardened() -> None:
    parsed = units()
    assert set(parsed) == {
        "konstruct-migrate.service",
        "konstruct-gateway.service",
        "konstruct-worker-scheduler.service",
        "konstruct-worker@.service",
        "konstruct.target",
    }
    data_dir = env_file(SYSTEMD / "konstruct.env.example")["KONSTRUCT_DATA__DIR"]
    for name, parsed_unit in parsed.items():
        assert parsed_unit.has_section("Unit") and parsed_unit.has_section("Install"), name
        if name.endswith(".target"):
            assert parsed_unit["Install"]["WantedBy"] == "multi-user.target"
            continue
        service = parsed_unit["Service"]
        assert parsed_unit["Unit"]["PartOf"] == "konstruct.target", name
        assert parsed_unit["Install"]["WantedBy"] == "konstruct.target", name
        assert service["User"] == "konstruct", name
        assert service["EnvironmentFile"] == "/etc/konstruct/konstruct.env", name
        assert service["ExecStart"].startswith("/opt/konstruct/venv/bin/konstruct "), name
        assert service["NoNewPrivileges"] == "yes" and service["PrivateTmp"] == "yes" and service["ProtectHome"] == "yes", name
        assert service["ProtectSystem"] == "strict", name
        assert data_dir in words(service["ReadWritePaths"]), name
        assert service["StateDirectory"] == Path(data_dir).name and data_dir.startswith("/var/lib/"), name
        assert service["WorkingDirectory"] == data_dir, name


def test_systemd_migrations_run_before_everything_else() -> None:
    parsed = units()
    migrate = parsed["konstruct-migrate.service"]
    assert migrate["Service"]["Type"] == "oneshot"
    assert migrate["Service"]["RemainAfterExit"] == "yes"
    assert words(migrate["Service"]["ExecStart"])[1:] == ["db", "upgrade"]
    assert words(migrate["Service"]["ExecReload"])[1:] == ["db", "upgrade"]
    assert {"konstruct-gateway.service", "konstruct-worker-scheduler.service"} <= set(words(migrate["Unit"]["Before"]))
    for name, parsed_unit in parsed.items():
        if name in ("konstruct-migrate.service", "konstruct.target"):
            continue
        assert "konstruct-migrate.service" in words(parsed_unit["Unit"]["Requires"]), name
        assert "konstruct-migrate.service" in words(parsed_unit["Unit"]["After"]), name
        assert parsed_unit["Service"]["Restart"] == "on-failure", name


def test_systemd_workers_stop_with_sigint_and_exactly_one_schedules() -> None:
    settings = load_settings(SHARED_TOML)
    parsed = units()
    workers = {name: u for name, u in parsed.items() if name.startswith("konstruct-worker")}
    assert set(workers) == {"konstruct-worker-scheduler.service", "konstruct-worker@.service"}
    for name, parsed_unit in workers.items():
        service = parsed_unit["Service"]
        assert words(service["ExecStart"])[1] == "worker", name
        assert service["KillSignal"] == "SIGINT", name
        assert seconds(service["TimeoutStopSec"]) > worker_grace(settings) + 30, name
    assert "--no-periodic" not in words(workers["konstruct-worker-scheduler.service"]["Service"]["ExecStart"])
    assert "--no-periodic" in words(workers["konstruct-worker@.service"]["Service"]["ExecStart"])
    gateway = parsed["konstruct-gateway.service"]["Service"]
    assert words(gateway["ExecStart"])[1:] == ["gateway"]
    assert gateway["KillSignal"] == "SIGTERM"


def test_systemd_environment_loads_as_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    env = env_file(SYSTEMD / "konstruct.env.example")
    assert {"HF_HUB_OFFLINE", "LITELLM_LOCAL_MODEL_COST_MAP"} <= set(env)
    assert env[CONFIG_ENV] == "/etc/konstruct/konstruct.toml"  # where the README installs konstruct.example.toml
    env[CONFIG_ENV] = str(SHARED_TOML)
    clean_environment(monkeypatch, env)
    settings = load_settings()  # found through KONSTRUCT_CONFIG, as the units find it
    assert settings.config_path == SHARED_TOML
    assert not settings.embedded_database
    assert settings.queue.url is not None and settings.queue.url.startswith("redis://")
    assert str(settings.data_dir) == env["KONSTRUCT_DATA__DIR"]
    assert settings.gateway.public_url.startswith("https://")


def test_systemd_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    """Where systemd-analyze is at hand, it checks every directive and value, which configparser cannot."""
    analyze = shutil.which("systemd-analyze")
    system = next((p for p in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")) if (p / "sysinit.target").is_file()), None)
    if analyze is None or system is None:
        pytest.skip("no systemd-analyze or system units on this machine")
    version = subprocess.run([analyze, "--version"], capture_output=True, text=True, check=True).stdout
    if int(re.search(r"systemd (\d+)", version).group(1)) < 250:  # type: ignore[union-attr]
        pytest.skip("systemd-analyze verify --root needs systemd 250 or newer")
    root = tmp_path / "root"
    shutil.copytree(system, root / "usr/lib/systemd/system", symlinks=True)
    installed = root / "etc/systemd/system"
    installed.mkdir(parents=True)
    for path in [*SYSTEMD.glob("*.service"), *SYSTEMD.glob("*.target")]:
        shutil.copy(path, installed)
    executable = root / "opt/konstruct/venv/bin/konstruct"
    executable.parent.mkdir(parents=True)
    executable.write_text("#!/bin/sh\n")
    executable.chmod(0o755)
    names = [path.name.replace("@.service", "@1.service") for path in sorted(installed.iterdir())]
    result = subprocess.run(
        [analyze, "verify", "--man=no", f"--root={root}", *names], cwd=installed, capture_output=True, text=True, timeout=120
    )
    output = result.stdout + result.stderr
    assert not [line for line in output.splitlines() if "konstruct" in line], output
    if result.returncode != 0:
        pytest.skip(f"systemd-analyze failed on this machine's own units: {output[:300]}")


# -- names used anywhere -----------------------------------------------------------------------------


def deploy_texts() -> Iterator[tuple[str, str]]:
    for path in sorted(DEPLOY.rglob("*")):
        if path.is_file():
            yield str(path.relative_to(ROOT)), path.read_text(encoding="utf-8")
    readme = (ROOT / "README.md").read_text()
    start = readme.index("## Deployment\n")
    end = readme.index("\n## ", start + 1)
    yield "README.md#deployment", readme[start:end]


def test_readme_deployment_section_keeps_the_scale_out_facts_and_points_here() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "## Scale-out" not in readme
    section = dict(deploy_texts())["README.md#deployment"]
    for fact in (
        "gateways are stateless",
        "workers scale horizontally",
        "`database.url`, the owner role",
        "`database.app_password`",
        'queue.url = "redis://',
        "`--no-periodic` on all but one",
        "Stop workers with SIGINT",
        "runs `konstruct up` on the embedded database under `/data`",
        "(examples/deploy/README.md)",
    ):
        assert fact in " ".join(section.split()), fact


def test_every_konstruct_variable_is_a_real_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    examples: dict[str, str] = {}
    for path in (DEPLOY / ".env.example", SYSTEMD / "konstruct.env.example"):
        examples.update({k: v for k, v in env_file(path, commented=True).items() if v})
    names = {name: where for where, text in deploy_texts() for name in SETTING_NAME.findall(text)}
    assert len(names) > 15
    for name, where in sorted(names.items()):
        if name == CONFIG_ENV:
            continue
        path = name.removeprefix("KONSTRUCT_").lower().split("__")
        field = Settings.model_fields.get(path[0])
        assert field is not None, f"{name} ({where}): no setting {path[0]!r}"
        model = field.annotation
        if len(path) == 1:
            assert not (isinstance(model, type) and issubclass(model, BaseModel)), f"{name} ({where}): {path[0]} is a section"
        else:
            assert len(path) == 2 and isinstance(model, type) and issubclass(model, BaseModel), f"{name} ({where})"
            assert path[1] in model.model_fields, f"{name} ({where}): no setting {path[1]!r} in [{path[0]}]"
        if name in examples:  # the example value is valid for the setting
            clean_environment(monkeypatch, {name: examples[name]})
            Settings()


# -- konstruct commands ---------------------------------------------------------------------------------

COMMAND = re.compile(r"(?<![\w/.-])(?:konstruct|kon) ([a-z][a-z-]*)(?: ([a-z][a-z-]*))?(?=[\s`'\";]|$)([^`\n]*)")


def used_commands(compose: dict[str, Any]) -> dict[tuple[str, ...], set[str]]:
    """Every `konstruct ...` command path in the examples and the README section, with the options given."""
    root = typer.main.get_command(app)
    groups: dict[str, Any] = getattr(root, "commands", {})
    found: dict[tuple[str, ...], set[str]] = {}

    def add(argv: list[str], where: str) -> None:
        command = groups.get(argv[0])
        assert command is not None, f"{where}: `konstruct {argv[0]}` is no command"
        path = tuple(argv[:2]) if hasattr(command, "commands") else tuple(argv[:1])
        rest = argv[len(path) :]
        found.setdefault(path, set()).update(arg.split("=")[0] for arg in rest if arg.startswith("--"))

    for name, svc in konstruct_services(compose).items():
        add(svc["command"][1:], f"compose.yaml {name}")
    for name, parsed_unit in units().items():
        for key in ("ExecStart", "ExecReload"):
            if parsed_unit.has_option("Service", key):
                add(words(parsed_unit["Service"][key])[1:], f"{name} {key}")
    for where, text in deploy_texts():
        for match in COMMAND.finditer(text):
            if match.group(1) == "konstruct":  # the role, user or database name: `createdb --owner konstruct konstruct`
                continue
            add([w for w in (match.group(1), match.group(2)) if w] + match.group(3).split(), where)
    return found


def test_every_konstruct_command_used_exists(compose: dict[str, Any]) -> None:
    found = used_commands(compose)
    expected = {("gateway",), ("worker",), ("db", "upgrade"), ("doctor",), ("secrets", "reencrypt"), ("tenant", "create")}
    assert expected <= set(found), sorted(found)
    assert "--no-periodic" in found[("worker",)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = dict(zip(found, pool.map(lambda path: konstruct(*path, "--help"), found), strict=True))
    for path, result in results.items():
        assert result.returncode == 0, f"konstruct {' '.join(path)} --help: {result.stderr}"
        for option in found[path]:
            assert option in result.stdout, f"konstruct {' '.join(path)} has no {option}"
