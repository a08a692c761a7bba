"""Meta's Graph API as the WhatsApp channel uses it: send, mark read, fetch media. httpx, one pool per process."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Any

import httpx

from konstruct.config import WhatsAppSettings

# Graph error codes after which the same request may succeed later (rate limits, transient failures).
RETRYABLE = {1, 2, 4, 17, 80007, 130429, 131000, 131016, 131056, 133004}
OUTSIDE_WINDOW = 131047
WHATSAPP_TEXT_LIMIT = 4096


class GraphError(Exception):
    """The Graph API said no (or could not be reached). Carries Meta's code; never the token."""

    def __init__(self, code: int, message: str, *, http_status: int = 0) -> None:
        super().__init__(f"{code}: {message}" if code else message)
        self.code = code
        self.http_status = http_status

    @property
    def retryable(self) -> bool:
        return self.code in RETRYABLE or self.http_status == 429 or self.http_status >= 500 or self.code == 0


def signature_ok(app_secret: str, body: bytes, header: str | None) -> bool:
    """X-Hub-Signature-256 is `sha256=` + hex HMAC-SHA256 of the raw body with the app secret; compared in constant time."""
    if not header or not header.startswith("sha256=") or not app_secret:
        return False
    expected = hmac.new(app_secret.encode(), body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, header[len("sha256=") :].strip().lower())


@dataclass
class Graph:
    settings: WhatsAppSettings
    _http: httpx.AsyncClient | None = None

    @property
    def http(self) -> httpx.AsyncClient:
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=self.settings.timeout, follow_redirects=False)
        return self._http

    def url(self, path: str) -> str:
        return f"{self.settings.graph_url.rstrip('/')}/{self.settings.api_version}/{path.lstrip('/')}"

    async def call(self, method: str, path: str, token: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        try:
            response = await self.http.request(method, self.url(path), json=body, headers={"Authorization": f"Bearer {token}"})
        except httpx.HTTPError as exc:
            raise GraphError(0, f"cannot reach the Graph API ({type(exc).__name__})") from None
        try:
            data = response.json()
        except ValueError:
            data = {}
        if response.status_code >= 400 or not isinstance(data, dict) or "error" in data:
            found = data.get("error") if isinstance(data, dict) else None
            error: dict[str, Any] = found if isinstance(found, dict) else {}
            extra = error.get("error_data")
            details = extra.get("details") if isinstance(extra, dict) else None
            message = str(error.get("message") or f"HTTP {response.status_code}") + (f" ({details})" if details else "")
            raise GraphError(int(error.get("code") or 0), message, http_status=response.status_code)
        return data

    async def send(self, phone_number_id: str, token: str, body: dict[str, Any]) -> str:
        """POST a message; returns its wamid."""
        data = await self.call("POST", f"{phone_number_id}/messages", token, {"messaging_product": "whatsapp", **body})
        messages = data.get("messages") or [{}]
        return str(messages[0].get("id") or "")

    async def mark_read(self, phone_number_id: str, token: str, wamid: str) -> None:
        """Blue ticks on the person's message, and the typing indicator while the agent works."""
        await self.call(
            "POST",
            f"{phone_number_id}/messages",
            token,
            {"messaging_product": "whatsapp", "status": "read", "message_id": wamid, "typing_indicator": {"type": "text"}},
        )

    async def phone_number(self, phone_number_id: str, token: str) -> dict[str, Any]:
        """The number's display name and phone: proves the token can use it."""
        return await self.call("GET", f"{phone_number_id}?fields=display_phone_number,verified_name", token)

    async def media(self, media_id: str, token: str, max_bytes: int) -> tuple[bytes, str]:
        """GET /{media-id} → a short-lived URL → the bytes (with the same bearer token), size-limited."""
        if not (media_id.isascii() and media_id.isdigit()):
            raise GraphError(-1, "not a Meta media id (digits only)")  # never a path of our choosing with the token
        meta = await self.call("GET", media_id, token)
        url = meta.get("url")
        if not isinstance(url, str) or not url:
            raise GraphError(0, "the media has no download URL")
        if int(meta.get("file_size") or 0) > max_bytes:
            raise GraphError(0, f"the media is larger than {max_bytes} bytes")
        chunks: list[bytes] = []
        size = 0
        try:
            async with self.http.stream("GET", url, headers={"Authorization": f"Bearer {token}"}) as response:
                if response.status_code != 200:
                    raise GraphError(0, f"media download answered HTTP {response.status_code}", http_status=response.status_code)
                async for chunk in response.aiter_bytes():
                    size += len(chunk)
                    if size > max_bytes:
                        raise GraphError(0, f"the media is larger than {max_bytes} bytes")
                    chunks.append(chunk)
        except httpx.HTTPError as exc:
            raise GraphError(0, f"media download failed ({type(exc).__name__})") from None
        return b"".join(chunks), str(meta.get("mime_type") or "application/octet-stream")

    async def close(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None
