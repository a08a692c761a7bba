"""Config: one file, environment overrides, secret references, one-line errors."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from konstruct.config import Settings, did_you_mean, load_settings, mask_url, render_config
from konstruct.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "konstruct.toml"
    path.write_text(text)
    return path


def test_defaults_and_relative_data_dir(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, ""))
    assert settings.embedded_database
    assert settings.data_dir == (tmp_path / ".konstruct").resolve()
    assert settings.gateway.port == 8080


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, '[llm]\napi_base = "http://from-file"\ntimeout = 5\n')
    monkeypatch.setenv("KONSTRUCT_LLM__API_BASE", "http://from-env")
    monkeypatch.setenv("KONSTRUCT_GATEWAY__PORT", "9123")
    settings = load_settings(path)
    assert settings.llm.api_base == "http://from-env"
    assert settings.llm.timeout == 5  # untouched by the environment
    assert settings.gateway.port == 9123


def test_config_found_through_environment_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "[gateway]\nport = 9001\n")
    monkeypatch.setenv("KONSTRUCT_CONFIG", str(path))
    monkeypatch.chdir(ROOT)
    assert load_settings().gateway.port == 9001


def test_secret_references(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "db.secret").write_text("s3cret-app-pass\n")
    path = write(
        tmp_path,
        '[llm]\napi_key = { "$env" = "MY_LLM_KEY" }\n[database]\napp_password = { "$file" = "db.secret" }\n',
    )
    monkeypatch.setenv("MY_LLM_KEY", "sk-live-abcdefgh1234")
    settings = load_settings(path)
    assert settings.llm.api_key is not None and settings.llm.api_key.get_secret_value() == "sk-live-abcdefgh1234"
    assert settings.database.app_password is not None and settings.database.app_password.get_secret_value() == "s3cret-app-pass"
    shown = settings.masked()
    assert shown["llm"]["api_key"] == {"$env": "MY_LLM_KEY", "status": "set"}  # the reference, never the value
    assert shown["database"]["app_password"] == {"$file": "db.secret", "status": "set"}
    assert "s3cret" not in str(shown) and "abcdefgh" not in str(shown) and "1234" not in str(shown)
    monkeypatch.setenv("MY_LLM_KEY", "sk-rotated-99999999")
    assert settings.llm.api_key.get_secret_value() == "sk-rotated-99999999"  # read when used, not when loaded


def test_missing_env_reference_fails_only_where_the_secret_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOPE_NOT_SET", raising=False)
    path = write(tmp_path, '[llm]\napi_key = { "$env" = "NOPE_NOT_SET" }\n[smtp]\npassword = { "$file" = "no-such-file" }\n')
    settings = load_settings(path)  # loading needs neither
    assert settings.llm.api_key is not None and settings.smtp.password  # both count as set
    assert settings.masked()["llm"]["api_key"] == {"$env": "NOPE_NOT_SET", "status": "missing"}
    with pytest.raises(ConfigError, match=r"^llm\.api_key: environment variable NOPE_NOT_SET is not set; export it .*konstruct up") as info:
        settings.llm.api_key.get_secret_value()
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match=r"^smtp\.password: cannot read .*no-such-file"):
        settings.smtp.password.get_secret_value()
    assert len(settings.unreadable_references()) == 2
    monkeypatch.setenv("NOPE_NOT_SET", "sk-now-set-0000")
    assert settings.llm.api_key.get_secret_value() == "sk-now-set-0000"


def test_a_reference_in_a_setting_that_is_no_secret_is_read_at_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MY_QUEUE", "redis://cache:6379/0")
    path = write(tmp_path, '[queue]\nurl = { "$env" = "MY_QUEUE" }\n[llm]\nprovider_keys = { anthropic = { "$env" = "NOPE_NOT_SET" } }\n')
    settings = load_settings(path)
    assert settings.queue.url == "redis://cache:6379/0"
    with pytest.raises(ConfigError, match=r"llm\.provider_keys\.anthropic: environment variable NOPE_NOT_SET"):
        settings.llm.provider_keys["anthropic"].get_secret_value()


def test_billing_and_the_database_count_a_reference_as_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOPE_NOT_SET", raising=False)
    path = write(tmp_path, '[billing]\nstripe_api_key = { "$env" = "NOPE_NOT_SET" }\n[database]\nurl = { "$env" = "NOPE_NOT_SET" }\n')
    settings = load_settings(path)
    assert settings.billing.enabled and not settings.embedded_database  # configured; using them names the variable
    monkeypatch.setenv("NOPE_NOT_SET", "")
    assert not settings.billing.enabled and settings.embedded_database  # an empty value is "not set", as a literal


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[gateway]\nport = "eighty"\n', r"gateway\.port: .*integer"),
        ("[gateway]\nport = 70000\n", r"gateway\.port: .*65535"),
        ("[gatway]\nport = 1\n", r"unknown setting gatway — did you mean gateway\?"),
        ("[llm]\ntemperature = 1\n", r"unknown setting llm\.temperature \(see examples/konstruct\.toml"),
        ("[gateway]\nprot = 8080\n", r"konstruct\.toml: unknown setting gateway\.prot — did you mean gateway\.port\?"),
        (
            '[[billing.plans]]\nname = "pro"\nprice = "p_1"\n',
            r"unknown setting billing\.plans\.0\.price — did you mean billing\.plans\.0\.price_id\?",
        ),
        ("[llm\nmodel = 1\n", r"not valid TOML"),
    ],
)
def test_invalid_config_names_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        load_settings(write(tmp_path, text))
    assert "\n" not in str(info.value)


def test_no_config_file_says_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KONSTRUCT_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="konstruct init"):
        load_settings()


def test_database_url_password_is_masked() -> None:
    assert mask_url("postgresql://owner:hunter2@db.example:5432/k") == "postgresql://owner:****@db.example:5432/k"
    assert mask_url("postgresql://postgres:@/k?host=/tmp/x") is not None


def test_example_config_documents_every_setting() -> None:
    """examples/konstruct.toml is the rendered template: a new setting without docs fails here."""
    example = (ROOT / "examples" / "konstruct.toml").read_text()
    assert example == render_config(), (
        "regenerate: python -c 'from konstruct.config import render_config; print(render_config(), end=\"\")' > examples/konstruct.toml"
    )
    for section, field in Settings.model_fields.items():
        if section in ("config_path", "secret_key"):
            continue
        if section == "tenants":  # declared tenants: documented by example, not by defaults
            assert "# [[tenants]]" in example and field.description
            continue
        model = field.annotation
        for key, sub in model.model_fields.items():  # type: ignore[union-attr]
            assert sub.description, f"{section}.{key} has no description"
            assert f"# {key} =" in example or f"{key} =" in example, f"{section}.{key} missing from the example"


@pytest.mark.parametrize(
    ("text", "env", "public_url"),
    [
        ("", {}, "http://127.0.0.1:8080"),
        ("[gateway]\nport = 9123\n", {}, "http://127.0.0.1:9123"),
        ('[gateway]\nhost = "0.0.0.0"\nport = 9124\n', {}, "http://127.0.0.1:9124"),
        ('[gateway]\nhost = "::"\n', {}, "http://[::1]:8080"),
        ('[gateway]\nhost = "konstruct.lan"\n', {"KONSTRUCT_GATEWAY__PORT": "9125"}, "http://konstruct.lan:9125"),
        ('[gateway]\nport = 9126\npublic_url = "https://bots.example.com"\n', {}, "https://bots.example.com"),
        ("[gateway]\nport = 9127\n", {"KONSTRUCT_GATEWAY__PUBLIC_URL": "https://env.example.com"}, "https://env.example.com"),
    ],
)
def test_public_url_follows_the_address_unless_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, env: dict[str, str], public_url: str
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert load_settings(write(tmp_path, text)).gateway.public_url == public_url


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        (
            "KONSTRUCT_GATEWAY__PROT",
            "8080",
            "environment variable KONSTRUCT_GATEWAY__PROT: unknown setting KONSTRUCT_GATEWAY__PROT — did you mean KONSTRUCT_GATEWAY__PORT?",
        ),
        (
            "KONSTRUCT_GATWAY__PORT",
            "8080",
            "environment variable KONSTRUCT_GATWAY__PORT: unknown setting gatway.port — did you mean KONSTRUCT_GATEWAY__PORT?",
        ),
        (
            "KONSTRUCT_GATEWAY__PORT",
            "eighty",
            "environment variable KONSTRUCT_GATEWAY__PORT: gateway.port: Input should be a valid integer",
        ),
    ],
)
def test_a_bad_environment_variable_is_blamed_on_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, value: str, message: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, "[gateway]\nport = 8081\n"))
    assert str(info.value).startswith(message), info.value
    assert "konstruct.toml" not in str(info.value)


def test_environment_variables_of_no_section_are_left_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KONSTRUCT_CHROMIUM", "/usr/bin/chromium")  # not a setting, and not shaped like one
    assert load_settings(write(tmp_path, "")).gateway.port == 8080


def test_did_you_mean() -> None:
    assert did_you_mean("acme", ["acme-inc", "globex"]) == "acme-inc"
    assert did_you_mean("ava", ["Ava", "Bo"]) == "Ava"
    assert did_you_mean("initech", ["acme-inc", "globex"]) is None
    assert did_you_mean("glob", ["acme-inc", "globex-corporation"]) == "globex-corporation"


def test_effective_toml_reads_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """config show's TOML is TOML: booleans, references, unset values, plans, declared tenants, odd strings."""
    monkeypatch.setenv("MY_STRIPE", "sk_test_abcdefgh5678")
    monkeypatch.delenv("NOPE_NOT_SET", raising=False)
    path = write(
        tmp_path,
        '[llm]\napi_key = { "$env" = "NOPE_NOT_SET" }\n[agent]\napology = "Sorry \\"now\\"\\n\\tlater \\\\ ok"\n'
        '[billing]\nstripe_api_key = { "$env" = "MY_STRIPE" }\n'
        'plans = [{ name = "pro", price_id = "price_1", budget_usd = 5.0 }]\n[database]\napp_password = "literal-pass-4321"\n'
        '[[tenants]]\nslug = "acme"\nname = "Acme"\nagents = [{ name = "Ava", role = "Billing" }]\n',
    )
    settings = load_settings(path)
    text = settings.masked_toml()
    back = tomllib.loads(text)
    assert back["agent"]["web_fetch_private"] is False and "web_fetch_private = false" in text
    assert back["agent"]["apology"] == 'Sorry "now"\n\tlater \\ ok'
    assert back["llm"]["api_key"] == {"$env": "NOPE_NOT_SET"} and '{ "$env" = "NOPE_NOT_SET" }  # missing' in text
    assert back["billing"]["stripe_api_key"] == {"$env": "MY_STRIPE"} and "# set" in text
    assert "abcdefgh" not in text and "5678" not in text
    assert back["database"]["app_password"] == "…4321"
    assert back["billing"]["plans"] == [{"name": "pro", "price_id": "price_1", "budget_usd": 5.0}]
    assert back["tenants"] == [{"slug": "acme", "name": "Acme", "agents": [{"name": "Ava", "role": "Billing"}]}]
    assert "api_base" not in back["llm"] and "# api_base =" in text  # unset: a comment (TOML has no null)
    assert back["gateway"]["public_url"] == "http://127.0.0.1:8080"
    assert "secret_key" not in back and text.index("# secret_key") < text.index("[data]")
