"""The gateway as a real process over HTTP."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

from konstruct.config import Settings
from tests.helpers import Proc, cli_env, wait_for


def get(url: str) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_health_and_readiness(config_path: Path, settings: Settings, tmp_path: Path) -> None:
    gateway = Proc("gateway", ["gateway"], config=config_path, log_dir=tmp_path)
    try:
        gateway.wait_for_log("Uvicorn running on")
        base = f"http://127.0.0.1:{settings.gateway.port}"
        assert get(f"{base}/healthz") == (200, {"status": "ok"})
        status, body = get(f"{base}/readyz")
        assert status == 200 and body["status"] == "ready", body
        assert body["checks"] == {"database": "ok", "queue": "ok", "queue_pending": "0"}  # type: ignore[comparison-overlap]
    finally:
        assert gateway.stop() == 0


def test_several_gateway_processes_each_log_as_the_command_does(config_path: Path, settings: Settings, tmp_path: Path) -> None:
    """gateway.workers = 2: uvicorn starts two processes of its own, and each logs its lines, formatted, at INFO."""
    gateway = Proc("gateway", ["gateway"], config=config_path, log_dir=tmp_path, env=cli_env(KONSTRUCT_GATEWAY__WORKERS="2"))
    try:
        wait_for(lambda: gateway.log().count("INFO    konstruct.gateway: gateway ready on") == 2, 60, "both processes ready")
        assert get(f"http://127.0.0.1:{settings.gateway.port}/readyz")[0] == 200
    finally:
        assert gateway.stop() == 0
