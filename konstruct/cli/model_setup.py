"""The model part of `konstruct init`: asking for it, changing [llm] in an existing konstruct.toml, the test call."""

from __future__ import annotations

import asyncio
import re
import sys
import tomllib
from pathlib import Path
from typing import Any, NoReturn

import typer
from rich.markup import escape

from konstruct.cli.common import out
from konstruct.config import _toml_value, load_settings, read_secret_from_environment
from konstruct.errors import ConfigError, KonstructError
from konstruct.llm import probe
from konstruct.llm.client import LLMError

DEFAULT_MODEL = "openai/gpt-4o-mini"
# Hosted providers whose key is usually in <PROVIDER>_API_KEY: suggested when asking (a local server needs none).
KEYED_PROVIDERS = frozenset({"openai", "anthropic", "gemini", "mistral", "groq", "deepseek", "cohere", "openrouter", "xai"})
_HEADER = re.compile(r"^\s*\[([^\[\]]+)\]\s*(#.*)?$")


def llm_values(model: str | None, api_base: str | None, api_key_env: str | None, current: dict[str, Any]) -> dict[str, Any]:
    """The [llm] settings given as flags; on a terminal with none given, asked for (Enter keeps the current value
    of an existing konstruct.toml, or a default)."""
    if model is None and api_base is None and api_key_env is None and sys.stdin.isatty():
        model = str(typer.prompt("Model (litellm's provider/model)", default=current.get("model") or DEFAULT_MODEL)).strip()
        api_base = str(typer.prompt("API base of an OpenAI-compatible server (Ollama, vLLM, llama.cpp; Enter: the provider's)",
                                    default=current.get("api_base") or "", show_default=bool(current.get("api_base")))).strip() or None  # fmt: skip
        provider = model.split("/", 1)[0] if "/" in model else "openai"
        key = current.get("api_key")
        suggested = key["$env"] if isinstance(key, dict) and "$env" in key else ""
        if not suggested and provider in KEYED_PROVIDERS and not api_base:
            suggested = f"{provider.upper()}_API_KEY"
        api_key_env = str(typer.prompt("Environment variable holding the key (Enter: none)", default=suggested)).strip() or None
    values: dict[str, Any] = {}
    if model:
        values["model"] = model
    if api_base:
        values["api_base"] = api_base
    if api_key_env:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", api_key_env):
            raise ConfigError(f"--llm-api-key-env takes the variable's name (like OPENAI_API_KEY), not {api_key_env[:3]}…")
        values["api_key"] = {"$env": api_key_env}
    return values


def current_llm(path: Path) -> dict[str, Any]:
    """The [llm] table of an existing konstruct.toml as written (references unresolved); empty when there is none."""
    try:
        return dict(tomllib.loads(path.read_text()).get("llm", {}))
    except (OSError, tomllib.TOMLDecodeError):
        return {}


def update_sections(text: str, values: dict[str, dict[str, Any]]) -> str:
    """konstruct.toml with the given settings set in their sections, everything else (comments included) kept: a
    setting's line (or its commented-out default) is replaced, a new one goes under the section's header."""
    lines = text.splitlines()
    for section, settings in values.items():
        start = next((i for i, line in enumerate(lines) if (m := _HEADER.match(line)) and m[1].strip() == section), None)
        if start is None:
            lines += ["", f"[{section}]"]
            start = len(lines) - 1
        end = next((i for i in range(start + 1, len(lines)) if _HEADER.match(lines[i])), len(lines))
        for key, value in settings.items():
            setting = f"{key} = {_toml_value(value)}"
            pattern = re.compile(rf"^\s*(#\s*)?{re.escape(key)}\s*=")
            found = [i for i in range(start + 1, end) if pattern.match(lines[i])]
            live = [i for i in found if not lines[i].lstrip().startswith("#")]
            if found:
                lines[(live or found)[0]] = setting
            else:
                lines.insert(start + 1, setting)
                end += 1
    updated = "\n".join(lines) + "\n"
    try:
        tomllib.loads(updated)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"konstruct.toml could not be changed in place ({exc}): rewrite it with `konstruct init --force`") from None
    return updated


def write_update(path: Path, values: dict[str, dict[str, Any]]) -> None:
    """Change the given settings of an existing konstruct.toml (atomically: a reader never sees half a file)."""
    updated = update_sections(path.read_text(), values)
    tmp = path.with_suffix(".toml.tmp")
    tmp.write_text(updated)
    tmp.replace(path)
    out.print(f"[green]Updated[/green] {escape(', '.join(f'[{s}]' for s in values))} in {path}")


def report_test_call(path: Path, key_env: str | None) -> None:
    """The test call with the file just written (and this shell's environment), said in one line. Fails (exit 1)
    when the model did not answer: the config stays written."""
    if key_env:
        try:
            read_secret_from_environment(key_env, "llm.api_key")
        except ConfigError:
            _failed(f"model: {probe.missing_key(f'${key_env}', None, 'this shell')}")
    try:
        cfg = load_settings(path)
    except KonstructError as exc:
        _failed(str(exc))
    check = asyncio.run(probe.check_platform_model(cfg))
    if check.ok:
        out.print(f"[green]{check.line()}[/green]")
        return
    _failed(check.line())


def _failed(line: str) -> NoReturn:
    raise LLMError(f"{line} — konstruct.toml is written; fix that and check again with `konstruct doctor`")
