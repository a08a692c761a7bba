"""Secrets at rest: Fernet with a rotatable master key (MultiFernet)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from konstruct.config import Settings
from konstruct.errors import ConfigError

SECRET_KEY_FILE = "secret.key"


def secret_key_path(settings: Settings) -> Path:
    return settings.data_dir / SECRET_KEY_FILE


def create_secret_key_file(path: Path) -> None:
    """Write a new master key to a file only its owner can read."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(Fernet.generate_key().decode() + "\n")


def master_keys(settings: Settings) -> list[str]:
    """The master keys, newest first: from KONSTRUCT_SECRET_KEY or the key file."""
    if settings.secret_key is not None and settings.secret_key.get_secret_value().strip():
        raw = settings.secret_key.get_secret_value()
    else:
        path = secret_key_path(settings)
        try:
            raw = path.read_text()
        except FileNotFoundError:
            raise ConfigError(f"no master key: set KONSTRUCT_SECRET_KEY or run `konstruct init` to create {path}") from None
        if path.stat().st_mode & 0o077:
            raise ConfigError(f"{path} is readable by others: run `chmod 600 {path}`")
    keys = [part.strip() for part in raw.replace("\n", ",").split(",") if part.strip()]
    if not keys:
        raise ConfigError("the master key is empty: set KONSTRUCT_SECRET_KEY or run `konstruct init`")
    return keys


_fernets: dict[tuple[str, ...], MultiFernet] = {}


def fernet(settings: Settings) -> MultiFernet:
    """A MultiFernet over the master keys: encrypts with the first, decrypts with any."""
    source = (settings.secret_key.get_secret_value(),) if settings.secret_key is not None else None
    if source is None or not source[0].strip():
        # The key file is read once per process (webhooks decrypt on every request); `secrets rotate` restarts.
        source = (str(secret_key_path(settings)),)
    cached = _fernets.get(source)
    if cached is not None:
        return cached
    try:
        built = MultiFernet([Fernet(key.encode()) for key in master_keys(settings)])
    except ValueError:
        raise ConfigError("the master key is not a valid Fernet key (32 url-safe base64-encoded bytes)") from None
    _fernets[source] = built
    return built


def encrypt(settings: Settings, plaintext: str) -> bytes:
    return fernet(settings).encrypt(plaintext.encode())


def decrypt(settings: Settings, token: bytes) -> str:
    with contextlib.suppress(InvalidToken):
        return fernet(settings).decrypt(token).decode()
    # `konstruct secrets rotate` may have added a key since this process read them: read them again, once.
    _fernets.clear()
    try:
        return fernet(settings).decrypt(token).decode()
    except InvalidToken:
        raise ConfigError("a stored secret cannot be decrypted with the current master key") from None


def _write_key_file(path: Path, keys: list[str]) -> None:
    """Replace the key file atomically, readable by its owner only."""
    tmp = path.with_name(path.name + ".new")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write("\n".join(keys) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fernets.clear()


def add_master_key(settings: Settings) -> int:
    """Put a new master key first in the key file (older keys stay, to read what is not re-encrypted yet).
    Returns how many keys the file holds now."""
    keys = master_keys(settings)
    _write_key_file(secret_key_path(settings), [Fernet.generate_key().decode(), *keys])
    return len(keys) + 1


def drop_old_master_keys(settings: Settings) -> int:
    """Keep only the newest master key in the key file. Returns how many were dropped."""
    keys = master_keys(settings)
    if len(keys) > 1:
        _write_key_file(secret_key_path(settings), keys[:1])
    return len(keys) - 1
