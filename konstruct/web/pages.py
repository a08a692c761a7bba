"""The read-only status page: server-rendered HTML (jinja2), no JavaScript. Sign-in with a secure,
HttpOnly, SameSite session cookie and a CSRF token on every form; what a user sees is scoped by
role (konstruct/tenancy/access.py) and read inside tenant transactions (row-level security)."""

from __future__ import annotations

import functools
import secrets
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from markupsafe import Markup
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route
from starlette.templating import Jinja2Templates

from konstruct import transcript
from konstruct.bodies import read_body
from konstruct.config import Settings
from konstruct.db.engine import Database
from konstruct.errors import KonstructError, NotFoundError, PermissionDenied, ValidationError
from konstruct.money import usd
from konstruct.tenancy import access, invitations
from konstruct.tenancy.access import Principal
from konstruct.web import overview, sessions
from konstruct.web.sessions import COOKIE, LOGIN_CSRF_COOKIE, WebSession

templates = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))
templates.env.filters["usd"] = usd
MAX_FORM = 16_000


def _secure(settings: Settings) -> bool:
    """Secure cookies over HTTPS, and on loopback (browsers treat it as a secure context)."""
    parts = urlsplit(settings.gateway.public_url)
    return parts.scheme == "https" or parts.hostname in ("127.0.0.1", "localhost")


async def _form(request: Request) -> dict[str, str]:
    body = await read_body(request, MAX_FORM)
    if body is None:
        raise ValidationError("the form is too large")
    if "application/x-www-form-urlencoded" not in request.headers.get("content-type", ""):
        raise ValidationError("the form must be sent as application/x-www-form-urlencoded")
    try:
        form = parse_qs(body.decode("utf-8"), keep_blank_values=True, max_num_fields=50)
    except (UnicodeDecodeError, ValueError):
        raise ValidationError("the form is not valid UTF-8 form data") from None
    fields = {key: values[0] for key, values in form.items()}
    if any("\x00" in key or "\x00" in value for key, value in fields.items()):
        raise ValidationError("the form contains a NUL character")
    return fields


def _render(request: Request, name: str, context: dict[str, Any], status: int = 200) -> Response:
    response = templates.TemplateResponse(request, name, context, status_code=status)
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Content-Security-Policy"] = "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; form-action 'self'"
    response.headers["Referrer-Policy"] = "no-referrer"
    return response


async def _current(request: Request) -> tuple[WebSession, Principal] | None:
    db: Database = request.app.state.db
    web_session = await sessions.load(db, request.cookies.get(COOKIE))
    if web_session is None:
        return None
    return web_session, await sessions.principal(db, web_session)


SignedInPage = Callable[[Request, WebSession, Principal], Awaitable[Response]]


def signed_in(page: SignedInPage) -> Callable[[Request], Awaitable[Response]]:
    """A route for signed-in users only, handed their session and principal; anyone else goes to /login."""

    @functools.wraps(page)
    async def endpoint(request: Request) -> Response:
        current = await _current(request)
        if current is None:
            return RedirectResponse("/login", status_code=303)
        return await page(request, *current)

    return endpoint


def _page(request: Request, web_session: WebSession, principal: Principal, name: str, **context: Any) -> Response:
    banner = None
    if web_session.impersonation_active:
        banner = {"reason": web_session.impersonation_reason, "until": web_session.impersonation_until}
    return _render(request, name, {"me": principal, "email": web_session.email, "csrf": web_session.csrf, "banner": banner, **context})


def _check_csrf(web_session: WebSession, form: dict[str, str]) -> None:
    if not sessions.same(form.get("csrf", ""), web_session.csrf):
        raise PermissionDenied("the form expired or did not come from this page: reload it and try again")


# -- sign-in --


async def login_form(request: Request, error: str | None = None, status: int = 200) -> Response:
    settings: Settings = request.app.state.settings
    token = request.cookies.get(LOGIN_CSRF_COOKIE) or secrets.token_urlsafe(24)
    response = _render(request, "login.html", {"csrf": token, "error": error, "me": None, "banner": None}, status)
    response.set_cookie(LOGIN_CSRF_COOKIE, token, httponly=True, secure=_secure(settings), samesite="strict", max_age=3600)
    return response


async def login(request: Request) -> Response:
    settings: Settings = request.app.state.settings
    form = await _form(request)
    if not sessions.same(form.get("csrf", ""), request.cookies.get(LOGIN_CSRF_COOKIE, "")):
        return await login_form(request, "The form expired: please try again.", 403)
    address = sessions.client_address(
        request.client.host if request.client else None, request.headers.get("x-forwarded-for"), settings.web.trusted_proxies
    )
    try:
        token, _web_session = await sessions.sign_in(
            request.app.state.db, settings, form.get("email", ""), form.get("password", ""), address
        )
    except sessions.TooManyAttempts as exc:
        return await login_form(request, str(exc).capitalize() + ".", 429)
    except ValidationError as exc:
        return await login_form(request, str(exc).capitalize() + ".", 401)
    response = RedirectResponse("/", status_code=303)
    response.set_cookie(
        COOKIE, token, httponly=True, secure=_secure(settings), samesite="lax", max_age=int(settings.web.session_hours * 3600), path="/"
    )
    response.delete_cookie(LOGIN_CSRF_COOKIE)
    return response


async def logout(request: Request) -> Response:
    current = await _current(request)
    if current is not None:
        _check_csrf(current[0], await _form(request))
        await sessions.sign_out(request.app.state.db, current[0])
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(COOKIE, path="/")
    return response


# -- pages --


@signed_in
async def home(request: Request, web_session: WebSession, principal: Principal) -> Response:
    db: Database = request.app.state.db
    visible = await access.tenants(db, principal, "status.view")
    if not principal.platform_admin and len(visible) == 1:
        return RedirectResponse(f"/tenants/{visible[0].slug}", status_code=303)
    health = await overview.health(db, request.app.state.queue, request.app.state.settings.data_dir) if principal.platform_admin else None
    return _page(request, web_session, principal, "home.html", tenants=visible, health=health)


@signed_in
async def tenant_page(request: Request, web_session: WebSession, principal: Principal) -> Response:
    db: Database = request.app.state.db
    tenant = await access.tenant(db, principal, request.path_params["slug"], "status.view")
    view = await overview.tenant_view(db, request.app.state.settings, tenant)
    chart = Markup(overview.bar_chart(view.daily_cost))  # built from numbers and our own labels only
    billing_on = request.app.state.settings.billing.enabled
    return _page(request, web_session, principal, "tenant.html", view=view, chart=chart, billing_on=billing_on)


@signed_in
async def transcript_page(request: Request, web_session: WebSession, principal: Principal) -> Response:
    """One conversation, read-only, for the tenant's own people (and a platform admin): checked, read, audited."""
    db: Database = request.app.state.db
    tenant = await access.tenant(db, principal, request.path_params["slug"], "conversation.read")
    try:
        conversation_id = uuid.UUID(request.path_params["id"])
    except ValueError:
        raise NotFoundError("no such conversation: pick one from the tenant's page") from None
    found = await transcript.read(db, tenant, conversation_id, actor=principal.name, via="web")
    return _page(request, web_session, principal, "transcript.html", tenant=tenant, t=found)


@signed_in
async def impersonate(request: Request, web_session: WebSession, principal: Principal) -> Response:
    form = await _form(request)
    _check_csrf(web_session, form)
    db: Database = request.app.state.db
    tenant = await access.tenant(db, principal, form.get("tenant", ""), "impersonate")
    await sessions.impersonate(db, request.app.state.settings, web_session, principal, tenant, form.get("reason", ""))
    return RedirectResponse(f"/tenants/{tenant.slug}", status_code=303)


@signed_in
async def stop_impersonating(request: Request, web_session: WebSession, principal: Principal) -> Response:
    _check_csrf(web_session, await _form(request))
    await sessions.stop_impersonating(request.app.state.db, web_session)
    return RedirectResponse("/", status_code=303)


# -- invitations --


async def invite_form(request: Request) -> Response:
    token = request.path_params["token"]
    try:
        pending = await invitations.look_up(request.app.state.db, token)
    except KonstructError as exc:
        return _render(request, "message.html", {"title": "Invitation", "message": str(exc), "me": None, "banner": None}, exc.http_status)
    csrf = request.cookies.get(LOGIN_CSRF_COOKIE) or secrets.token_urlsafe(24)
    response = _render(
        request, "invite.html",
        {"email": pending.invitation.email, "tenant": pending.tenant_name, "role": pending.invitation.role, "csrf": csrf, "error": None,
         "me": None, "banner": None},
    )  # fmt: skip
    response.set_cookie(LOGIN_CSRF_COOKIE, csrf, httponly=True, secure=_secure(request.app.state.settings), samesite="strict", max_age=3600)
    return response


async def invite_accept(request: Request) -> Response:
    token = request.path_params["token"]
    form = await _form(request)
    if not sessions.same(form.get("csrf", ""), request.cookies.get(LOGIN_CSRF_COOKIE, "")):
        raise PermissionDenied("the form expired: reload the invitation link and try again")
    if form.get("password", "") != form.get("confirm", ""):
        raise ValidationError("the two passwords differ")
    email, role, tenant = await invitations.accept(request.app.state.db, token, name=form.get("name", ""), password=form.get("password"))
    message = f"Welcome, {email}: you are {role.replace('_', ' ')} of {tenant}. You can sign in now."
    return _render(request, "message.html", {"title": "Welcome", "message": message, "me": None, "banner": None, "sign_in": True})


async def error_page(request: Request, exc: Exception) -> Response:
    """KonstructErrors on the status page become a page, not JSON."""
    assert isinstance(exc, KonstructError)
    return _render(request, "message.html", {"title": "Not possible", "message": str(exc), "me": None, "banner": None}, exc.http_status)


ROUTES = [
    Route("/", home),
    Route("/login", login_form, methods=["GET"]),
    Route("/login", login, methods=["POST"]),
    Route("/logout", logout, methods=["POST"]),
    Route("/tenants/{slug}", tenant_page),
    Route("/tenants/{slug}/conversations/{id}", transcript_page),
    Route("/impersonate", impersonate, methods=["POST"]),
    Route("/impersonate/stop", stop_impersonating, methods=["POST"]),
    Route("/invite/{token}", invite_form, methods=["GET"]),
    Route("/invite/{token}", invite_accept, methods=["POST"]),
]
