"""Multi-workspace install (OAuth v2), bound to one tenant by a signed, expiring state.

`konstruct channel connect slack --tenant T` prints {public_url}/slack/install?state=…; the state is an
HMAC (keyed from the master key) over the tenant id and an expiry. The browser that starts the install
also gets a cookie with the state, checked on the way back (login CSRF), as bolt's own flow does.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import html
import json
import secrets
import time
import uuid
from urllib.parse import urlencode

from slack_sdk.errors import SlackApiError
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from konstruct.channels import connections
from konstruct.channels.slack.api import bot_scopes
from konstruct.channels.slack.client import web_client
from konstruct.config import Settings, hint
from konstruct.db.engine import Database
from konstruct.errors import ConflictError, ValidationError
from konstruct.secrets import master_keys
from konstruct.tenancy.tenants import directory

COOKIE = "konstruct-slack-oauth-state"


def _key(settings: Settings) -> bytes:
    return hashlib.sha256(b"konstruct slack oauth state\0" + master_keys(settings)[0].encode()).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def make_state(settings: Settings, tenant_id: uuid.UUID, *, now: float | None = None) -> str:
    expires = int((now or time.time()) + settings.slack.install_link_ttl)
    payload = _b64(json.dumps({"t": str(tenant_id), "e": expires, "n": secrets.token_hex(8)}, separators=(",", ":")).encode())
    signature = _b64(hmac.new(_key(settings), payload.encode(), hashlib.sha256).digest())
    return f"{payload}.{signature}"


def read_state(settings: Settings, state: str, *, now: float | None = None) -> uuid.UUID:
    """The tenant an install link was made for; ValidationError when forged or expired."""
    invalid = ValidationError("this install link is not valid: ask for a new one (`konstruct channel connect slack`)")
    if not state.isascii() or len(state) > 1000:
        raise invalid
    payload, _, signature = state.partition(".")
    expected = _b64(hmac.new(_key(settings), payload.encode(), hashlib.sha256).digest())
    if not payload or not hmac.compare_digest(signature, expected):
        raise invalid
    try:  # signed by us, so well-formed; checked all the same
        data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        expires, tenant_id = float(data["e"]), uuid.UUID(data["t"])
    except (ValueError, KeyError, TypeError):
        raise invalid from None
    if expires < (now or time.time()):
        raise ValidationError("this install link has expired: ask for a new one (`konstruct channel connect slack`)")
    return tenant_id


def install_link(settings: Settings, tenant_id: uuid.UUID) -> str:
    if not settings.slack.client_id or settings.slack.client_secret is None or settings.slack.signing_secret is None:
        raise ValidationError(
            "multi-workspace install needs [slack] client_id, client_secret and signing_secret in the config; "
            "for one workspace, pass --bot-token-env and --signing-secret-env instead"
        )
    return f"{settings.gateway.public_url.rstrip('/')}/slack/install?{urlencode({'state': make_state(settings, tenant_id)})}"


def _page(title: str, message: str, status: int = 200) -> HTMLResponse:
    body = f"<!doctype html><title>{html.escape(title)}</title><h1>{html.escape(title)}</h1><p>{html.escape(message)}</p>"
    return HTMLResponse(body, status_code=status)


async def install(request: Request) -> Response:
    """Step 1: check the link, remember it in a cookie, send the person to Slack's consent page."""
    settings: Settings = request.app.state.settings
    state = request.query_params.get("state", "")
    try:
        read_state(settings, state)
    except (ValidationError, ValueError, KeyError) as exc:
        return _page("Install link not valid", str(exc) if isinstance(exc, ValidationError) else "The link is damaged.", 400)
    query = {
        "client_id": settings.slack.client_id,
        "scope": settings.slack.scopes or ",".join(bot_scopes()),
        "state": state,
        "redirect_uri": f"{settings.gateway.public_url.rstrip('/')}/slack/oauth_redirect",
    }
    response = RedirectResponse(f"{settings.slack.authorize_url}?{urlencode(query)}", status_code=302)
    secure = settings.gateway.public_url.startswith("https://")
    response.set_cookie(COOKIE, state, max_age=600, httponly=True, secure=secure, samesite="lax", path="/slack")
    return response


async def oauth_redirect(request: Request) -> Response:
    """Step 2: Slack sends the person back with a code; exchange it and store the installation."""
    settings: Settings = request.app.state.settings
    db: Database = request.app.state.db
    if request.query_params.get("error"):
        return _page("Slack install cancelled", f"Slack said: {request.query_params['error']}.", 400)
    state, code = request.query_params.get("state", ""), request.query_params.get("code", "")
    try:
        tenant_id = read_state(settings, state)
    except (ValidationError, ValueError, KeyError) as exc:
        return _page("Install link not valid", str(exc) if isinstance(exc, ValidationError) else "The link is damaged.", 400)
    if not hmac.compare_digest(request.cookies.get(COOKIE, ""), state):
        return _page("Install not started here", "Start the install from the link you were given, in this browser.", 400)
    if not code:
        return _page("Slack install failed", "Slack sent no code.", 400)
    assert settings.slack.client_secret is not None
    try:
        granted = await web_client(settings).oauth_v2_access(
            client_id=settings.slack.client_id or "",
            client_secret=settings.slack.client_secret.get_secret_value(),
            code=code,
            redirect_uri=f"{settings.gateway.public_url.rstrip('/')}/slack/oauth_redirect",
        )
    except SlackApiError as exc:
        return _page("Slack install failed", f"Slack refused the code ({exc.response.get('error')}). Start again from the link.", 400)
    bot_id = None
    with contextlib.suppress(SlackApiError):  # the v2 answer names the bot user, not the bot id on its own messages
        bot_id = (await web_client(settings, granted["access_token"]).auth_test()).get("bot_id")
    tenant = next((t for t in await directory(db) if t.id == tenant_id), None)
    if tenant is None:
        return _page("Slack install failed", "The organisation this link was made for no longer exists.", 410)
    team = granted.get("team") or {}
    token = granted["access_token"]
    try:
        connection, _ = await connections.connect(
            db,
            settings,
            tenant,
            kind="slack",
            external_id=team["id"],
            name=team.get("name") or team["id"],
            mode="oauth",
            credentials={"bot_token": token},
            details={
                "bot_user_id": granted.get("bot_user_id"),
                "bot_id": bot_id,
                "app_id": granted.get("app_id"),
                "scope": granted.get("scope"),
                "installed_by": (granted.get("authed_user") or {}).get("id"),
                "bot_token_hint": hint(token),
            },
            default_agent=None,
            actor=f"slack:{(granted.get('authed_user') or {}).get('id', 'unknown')}",
        )
    except ConflictError as exc:
        return _page("Workspace already connected", str(exc), 409)
    request.app.state.slack.connections.forget("slack", team["id"])
    response = _page("Konstruct is installed", f"{connection.name} is connected to {tenant.name}. You can close this page.")
    response.delete_cookie(COOKIE, path="/slack")
    return response
