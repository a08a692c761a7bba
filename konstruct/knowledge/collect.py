"""What `knowledge add` and `sync` send to the worker: files read where the command runs (so `add` from a laptop works
against a server), folders walked with include/exclude patterns, URLs passed on for the worker to fetch.

Each item is a JSON object for the job's request: a file ``{"uri", "name", "kind", "data"}`` (data base64), a URL
``{"uri", "url"}``; both with ``agent_ids``. What cannot be sent is listed as skipped, with why.
"""

from __future__ import annotations

import base64
import fnmatch
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from konstruct.errors import ValidationError
from konstruct.knowledge.extract import SUFFIXES, kind_for

MAX_FILE_BYTES = 20_000_000  # a file or fetched page larger than this is skipped (files) or fails (URLs)
MAX_JOB_BYTES = 64_000_000  # file bytes per job; a larger add is sent as several jobs


@dataclass
class Collection:
    """Items to ingest and what was skipped (``{"uri", "name", "status": "skipped", "error"}``)."""

    items: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)

    def skip(self, uri: str, name: str, reason: str) -> None:
        self.skipped.append({"uri": uri, "name": name, "status": "skipped", "chunks": 0, "error": reason})


def is_url(target: str) -> bool:
    return target.lower().startswith(("http://", "https://"))


def normalise_url(raw: str) -> str:
    """A URL as a source's uri: parsed, without its fragment; ValidationError for one that is not http(s)."""
    import httpx  # here: a worker imports this module at start-up, and httpx takes 0.03 s

    try:
        url = httpx.URL(raw.strip())
    except (httpx.InvalidURL, TypeError) as exc:
        raise ValidationError(f"{raw!r} is not a valid URL: {exc}") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise ValidationError(f"{raw!r}: only http and https URLs can be added")
    return str(url.copy_with(fragment=None))


def file_uri(path: Path) -> str:
    """A file source's uri: its absolute path on the machine that added it."""
    return str(path.expanduser().resolve())


def collect(
    targets: Sequence[str],
    *,
    agent_ids: Sequence[str] = (),
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    base: Path | None = None,
    read: bool = True,
) -> Collection:
    """Files, folders (recursively; hidden ones left out) and URLs as items; a missing path is a ValidationError.
    Relative paths are under ``base`` (default: the current directory); ``read=False`` leaves the bytes out (for a plan)."""
    found = Collection()
    agents = list(agent_ids)
    for target in targets:
        if is_url(target):
            url = normalise_url(target)
            found.items.append({"uri": url, "url": url, "agent_ids": agents})
            continue
        path = Path(target).expanduser()
        path = base / path if base is not None and not path.is_absolute() else path
        if path.is_dir():
            for file, relative in _walk(path, include, exclude):
                add_file(found, file, f"{path.resolve().name}/{relative}", agents, read=read)
        elif path.is_file():
            add_file(found, path, path.name, agents, read=read)
        else:
            raise ValidationError(f"{target}: no such file or folder (give files, folders or http(s) URLs)")
    return found


def _walk(folder: Path, include: Sequence[str], exclude: Sequence[str]) -> Iterator[tuple[Path, str]]:
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            file = Path(root) / name
            relative = file.relative_to(folder).as_posix()
            if include and not _matches(relative, include):
                continue
            if exclude and _matches(relative, exclude):
                continue
            yield file, relative


def _matches(relative: str, patterns: Sequence[str]) -> bool:
    """A glob against the path under the folder or the file name alone (``*.md``, ``drafts/*``, ``**/old/*``)."""
    name = relative.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatchcase(relative, p) or fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(relative, p.replace("**/", ""))
               for p in patterns)  # fmt: skip


def add_file(found: Collection, path: Path, name: str, agent_ids: Sequence[str], *, read: bool = True) -> None:
    """One file as an item, or skipped with why (unsupported type, too large, unreadable)."""
    uri = file_uri(path)
    kind = kind_for(path.name)
    if kind is None:
        found.skip(uri, name, f"not a type Konstruct reads ({path.suffix or 'no extension'}; it reads {', '.join(sorted(SUFFIXES))})")
        return
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            found.skip(uri, name, f"larger than {MAX_FILE_BYTES // 1_000_000} MB ({size:,} bytes)")
            return
        data = path.read_bytes() if read else b""
    except OSError as exc:
        found.skip(uri, name, f"cannot be read: {exc.strerror or exc}")
        return
    found.items.append({"uri": uri, "name": name, "kind": kind, "data": base64.b64encode(data).decode("ascii"),
                        "agent_ids": list(agent_ids)})  # fmt: skip


def item_bytes(item: dict[str, Any]) -> int:
    return len(item.get("data", "")) * 3 // 4


def batches(items: list[dict[str, Any]], limit: int = MAX_JOB_BYTES) -> list[list[dict[str, Any]]]:
    """Items grouped so that each job carries at most ``limit`` bytes of files (a single larger file alone)."""
    groups: list[list[dict[str, Any]]] = [[]]
    size = 0
    for item in items:
        weight = item_bytes(item)
        if groups[-1] and size + weight > limit:
            groups.append([])
            size = 0
        groups[-1].append(item)
        size += weight
    return groups
