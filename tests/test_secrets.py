"""Secrets at rest: Fernet under a rotatable master key."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from konstruct.config import Settings
from konstruct.errors import ConfigError
from konstruct.secrets import create_secret_key_file, decrypt, encrypt, master_keys


def settings_in(tmp_path: Path, secret_key: str | None = None) -> Settings:
    return Settings(data={"dir": tmp_path}, secret_key=secret_key)  # type: ignore[arg-type]


def test_round_trip_and_no_plaintext_in_the_token(tmp_path: Path) -> None:
    create_secret_key_file(tmp_path / "secret.key")
    settings = settings_in(tmp_path)
    token = encrypt(settings, "sk-live-very-secret")
    assert b"very-secret" not in token
    assert decrypt(settings, token) == "sk-live-very-secret"


def test_rotation_keeps_old_tokens_readable(tmp_path: Path) -> None:
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    token = encrypt(settings_in(tmp_path, old), "value")
    rotated = settings_in(tmp_path, f"{new},{old}")  # newest first
    assert decrypt(rotated, token) == "value"
    with pytest.raises(ConfigError, match="cannot be decrypted"):
        decrypt(settings_in(tmp_path, new), token)


def test_key_file_must_be_private(tmp_path: Path) -> None:
    create_secret_key_file(tmp_path / "secret.key")
    (tmp_path / "secret.key").chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        master_keys(settings_in(tmp_path))


def test_missing_key_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="konstruct init"):
        master_keys(settings_in(tmp_path))
