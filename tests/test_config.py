"""Config: one file, environment overrides, secret references, one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from konstruct.config import Settings, load_settings, mask_url, render_config
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
    assert shown["llm"]["api_key"] == "…1234"
    assert "s3cret" not in str(shown) and "abcdefgh" not in str(shown)


def test_missing_env_reference_is_a_one_line_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOPE_NOT_SET", raising=False)
    path = write(tmp_path, '[llm]\napi_key = { "$env" = "NOPE_NOT_SET" }\n')
    with pytest.raises(ConfigError, match=r"llm\.api_key: environment variable NOPE_NOT_SET is not set"):
        load_settings(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[gateway]\nport = "eighty"\n', r"gateway\.port: .*integer"),
        ("[gateway]\nport = 70000\n", r"gateway\.port: .*65535"),
        ("[gatway]\nport = 1\n", r"gatway: unknown setting"),
        ("[llm]\ntemperature = 1\n", r"llm\.temperature: unknown setting"),
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
