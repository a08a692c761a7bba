"""web_fetch's machinery: the host allow-list, the address check, a pinned connection, manual redirects, HTML to text.

Each hop (the URL, then up to ``MAX_REDIRECTS`` redirects) is checked the same way: http or https, a host on the
tenant's allow-list, every address the host resolves to public (unless ``ctx.allow_private``, or the address is in one of
``ctx.private_networks``). The request then goes to
the address that was checked, never to a second DNS answer: the URL's host is replaced by that IP address, the
``Host`` header keeps the name, and for https the TLS server name (SNI) and certificate check use the name too
(httpcore's ``sni_hostname`` request extension), so certificate verification is unchanged. Proxies from the environment
are ignored (``trust_env=False``) since they would make the connection somewhere else. The whole fetch has
``ctx.web_seconds`` ([agent] web_fetch_seconds); ``ctx.ca_file`` adds certificate authorities to the usual ones.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import ssl
from dataclasses import dataclass
from html.parser import HTMLParser
from typing import TYPE_CHECKING

import certifi

from konstruct.agent.tools.registry import ToolContext, ToolError
from konstruct.netguard import AddressError, IPAddress, host_allowed, is_ip, is_public, normalise_host, resolve

if TYPE_CHECKING:  # imported by the functions that fetch: a worker imports this module at start-up, httpx takes 0.03 s
    import httpx

MAX_BYTES = 200_000
MAX_REDIRECTS = 3
USER_AGENT = "Konstruct-web_fetch/0.1"

_REDIRECTS = {301, 302, 303, 307, 308}


@dataclass(frozen=True)
class Page:
    """What a fetch brought back (the body cut at ``MAX_BYTES``)."""

    url: str
    status: int
    content_type: str
    body: bytes
    truncated: bool
    charset: str | None = None

    def text(self) -> str:
        """The body as readable text: HTML reduced to its text, other text decoded, binary content described."""
        kind = self.content_type.split(";")[0].strip().lower()
        if not _is_text(kind):
            return f"(binary content of {len(self.body)} bytes, not shown)"
        try:
            text = self.body.decode(self.charset or "utf-8", errors="replace")
        except LookupError:
            text = self.body.decode("utf-8", errors="replace")
        return html_to_text(text) if kind in ("text/html", "application/xhtml+xml") else text


def _is_text(kind: str) -> bool:
    return (
        kind.startswith("text/")
        or kind in ("", "application/json", "application/xml", "application/javascript", "application/xhtml+xml")
        or kind.endswith(("+json", "+xml"))
    )


async def _checked_addresses(url: httpx.URL, ctx: ToolContext) -> list[IPAddress]:
    if url.scheme not in ("http", "https"):
        raise ToolError(f"only http and https URLs can be fetched, not {url.scheme or 'a relative URL'}")
    if url.userinfo:
        raise ToolError("URLs with a user name or password are not fetched")
    host = normalise_host(url.raw_host.decode("ascii"))
    if not host:
        raise ToolError("the URL has no host")
    if not host_allowed(host, ctx.allowed_hosts):
        raise ToolError(f"{host} is not on this workspace's web allow-list")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        addresses = await resolve(host, port)
    except AddressError as exc:
        raise ToolError(str(exc)) from None
    if not ctx.allow_private:
        networks = [ipaddress.ip_network(n, strict=False) for n in ctx.private_networks]
        refused = [a for a in addresses if not is_public(a) and not any(a.version == n.version and a in n for n in networks)]
        if refused:
            raise ToolError(f"{host} resolves to a private or reserved address ({refused[0]}); refused")
    return addresses


async def _send(client: httpx.AsyncClient, url: httpx.URL, addresses: list[IPAddress]) -> httpx.Response:
    """GET ``url`` from the first of ``addresses`` that accepts a connection, with the name kept for Host and TLS."""
    import httpx

    host = url.raw_host.decode("ascii")
    extensions = {"sni_hostname": host} if url.scheme == "https" and not is_ip(host) else {}
    failure: Exception | None = None
    for address in addresses:
        request = client.build_request(
            "GET", url.copy_with(host=str(address)), headers={"Host": url.netloc.decode("ascii")}, extensions=extensions
        )
        try:
            return await client.send(request, stream=True)
        except httpx.ConnectError as exc:
            failure = exc
    raise ToolError(f"could not connect to {normalise_host(host)}: {failure}")


async def fetch(url: str, ctx: ToolContext, *, max_bytes: int = MAX_BYTES) -> Page:
    """GET ``url`` under the rules above (the body cut at ``max_bytes``); a refusal or failure is a ``ToolError``."""
    import httpx

    try:
        async with asyncio.timeout(ctx.web_seconds):
            return await _fetch(url, ctx, max_bytes)
    except TimeoutError:
        raise ToolError(f"the fetch took longer than {ctx.web_seconds:g} seconds") from None
    except httpx.HTTPError as exc:
        raise ToolError(f"the fetch failed: {type(exc).__name__}: {exc}") from None


async def _fetch(raw_url: str, ctx: ToolContext, max_bytes: int) -> Page:
    import httpx

    try:
        url = httpx.URL(raw_url.strip())
    except (httpx.InvalidURL, TypeError) as exc:
        raise ToolError(f"not a valid URL: {exc}") from None
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity", "Accept": "text/html, text/*;q=0.9, */*;q=0.5"}
    async with httpx.AsyncClient(
        follow_redirects=False, trust_env=False, timeout=ctx.web_seconds, headers=headers, verify=_trusted(ctx.ca_file)
    ) as client:
        for hop in range(MAX_REDIRECTS + 1):
            addresses = await _checked_addresses(url, ctx)
            response = await _send(client, url, addresses)
            try:
                location = response.headers.get("Location")
                if response.status_code in _REDIRECTS and location:
                    if hop == MAX_REDIRECTS:
                        raise ToolError(f"more than {MAX_REDIRECTS} redirects; stopped at {url}")
                    try:
                        url = url.join(location)
                    except httpx.InvalidURL as exc:
                        raise ToolError(f"the redirect to {location!r} is not a valid URL: {exc}") from None
                    continue
                body, truncated = await _read(response, max_bytes)
                return Page(
                    str(url), response.status_code, response.headers.get("Content-Type", ""), body, truncated, response.charset_encoding
                )
            finally:
                await response.aclose()
    raise AssertionError("unreachable")


def _trusted(ca_file: str | None) -> ssl.SSLContext | bool:
    """What TLS certificates are checked against: httpx's default (certifi), plus an installation's own CAs."""
    if not ca_file:
        return True
    context = ssl.create_default_context(cafile=certifi.where())
    try:
        context.load_verify_locations(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ToolError(f"the certificate authorities in [agent] web_fetch_ca_file could not be read: {exc}") from None
    return context


async def _read(response: httpx.Response, max_bytes: int) -> tuple[bytes, bool]:
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        chunks.append(chunk)
        size += len(chunk)
        if size > max_bytes:
            break
    return b"".join(chunks)[:max_bytes], size > max_bytes


_SKIP = {"script", "style", "noscript", "template", "svg", "iframe", "object", "canvas"}
_HEADINGS = {"h1", "h2", "h3", "h4", "h5", "h6"}
_BLOCK = _HEADINGS | {"address", "article", "aside", "blockquote", "br", "dd", "div", "dl", "dt", "figcaption", "footer", "form", "header"}
_BLOCK |= {"hr", "li", "main", "nav", "ol", "p", "pre", "section", "table", "title", "tr", "ul"}


class _TextExtractor(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skipping = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _SKIP:
            self.skipping += 1
        elif tag in _BLOCK:
            self.parts.append("\n- " if tag == "li" else "\n")
        elif tag in ("td", "th"):
            self.parts.append(" ")

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIP:
            self.skipping = max(0, self.skipping - 1)
        elif tag in _BLOCK:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self.skipping:
            self.parts.append(data)


def html_to_text(html: str) -> str:
    """The readable text of an HTML page: no tags, scripts or styles; one line per block, blank runs collapsed."""
    parser = _TextExtractor()
    parser.feed(html)
    parser.close()
    lines = (re.sub(r"[ \t\r\f\v\u00a0]+", " ", line).strip() for line in "".join(parser.parts).split("\n"))
    return "\n".join(line for line in lines if line and line != "-")
