"""A loopback fake of an OpenAI-compatible chat completions API (what litellm's openai/ provider calls).

A real HTTP server on 127.0.0.1. It records every request, answers with `usage`, and can be told
to be slow or to fail. A request with `"stream": true` is answered as OpenAI streams: server-sent events of
`chat.completion.chunk` objects (text a word at a time, tool calls as `tool_calls` deltas with the arguments in
pieces), `stream_delay` seconds apart, then `data: [DONE]`; with `stream_options.include_usage` a last chunk with
no choices carries the usage. Run it alone for benchmarks: `python -m tests.fakes.llm --port 8999 --delay 2`.
"""

from __future__ import annotations

import argparse
import json
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from typing import Any

from tests.fakes.server import QuietHandler, serve, shutdown


@dataclass
class Recorded:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]


@dataclass
class FakeLLM:
    delay: float = 0.0
    stream_delay: float = 0.0  # seconds between two streamed chunks: a fixed token rate
    tool_text: str | None = None  # text the model writes along with its tool calls ("Let me check."), as some models do
    fail_status: int | None = None
    bad_keys: set[str] = field(default_factory=set)  # bearer tokens answered with 401, as a provider does a revoked key
    fail_models: dict[str, int] = field(default_factory=dict)  # model -> HTTP status: one model is down, others answer
    requests: list[Recorded] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}/v1"

    def reset(self) -> None:
        with self._lock:
            self.delay, self.stream_delay, self.fail_status, self.tool_text = 0.0, 0.0, None, None
            self.bad_keys.clear()
            self.fail_models.clear()
            self.requests.clear()
            self.max_in_flight = 0

    @staticmethod
    def tool_calls_for(body: dict[str, Any]) -> list[dict[str, Any]]:
        """Tool calls the person asked for with `[[call NAME {json args}]]`, made when the tool is offered
        and its result is not in the conversation yet (so the next turn answers with the result)."""
        messages = body.get("messages", [])
        if not body.get("tools") or (messages and messages[-1].get("role") == "tool"):
            return []
        last: dict[str, Any] = next((m for m in reversed(messages) if m.get("role") == "user"), {})
        content = last.get("content", "")
        if isinstance(content, list):
            content = " ".join(part.get("text", "") for part in content if isinstance(part, dict))
        offered = {t.get("function", {}).get("name") for t in body["tools"]}
        calls = []
        for n, match in enumerate(re.finditer(r"\[\[call (\w+) (\{.*?\})\]\]", str(content))):
            if match[1] in offered:
                calls.append(
                    {"id": f"call_{n}_{uuid.uuid4().hex[:8]}", "type": "function", "function": {"name": match[1], "arguments": match[2]}}
                )
        return calls

    @staticmethod
    def reply_for(body: dict[str, Any]) -> str:
        """The deterministic answer: the model name and the last user message (or the tool results it got)."""
        messages = body.get("messages", [])
        if messages and messages[-1].get("role") == "tool":
            results = [m.get("content", "") for m in messages if m.get("role") == "tool"]
            return f"[{body.get('model')}] Tool said: " + " | ".join(results)
        last: dict[str, Any] = next((m for m in reversed(messages) if m.get("role") == "user"), {})
        content = last.get("content", "")
        if isinstance(content, list):
            content = " ".join(part.get("text", "") for part in content if isinstance(part, dict))
        # Given passages from the tenant's documents, it cites the first source, as the prompt asks a model to.
        system = messages[0].get("content", "") if messages and messages[0].get("role") == "system" else ""
        cited = re.search(r"^Source: (.+?)(?: — .*)?$", str(system), re.M)
        return f"[{body.get('model')}] You said: {content}" + (f" [{cited[1]}]" if cited else "")

    def start(self, port: int = 0) -> FakeLLM:
        fake = self

        class Handler(QuietHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                try:
                    body = json.loads(raw or b"{}")
                except ValueError:
                    self._send(400, {"error": {"message": "body is not JSON", "type": "invalid_request_error"}})
                    return
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    self._send(404, {"error": {"message": f"no route {self.path}", "type": "invalid_request_error"}})
                    return
                with fake._lock:
                    fake.requests.append(Recorded(self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                    fake.in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                    delay, fail = fake.delay, fake.fail_status
                    token = self.headers.get("Authorization", "").removeprefix("Bearer ").strip()
                    if token in fake.bad_keys:
                        fail = 401
                    fail = fake.fail_models.get(str(body.get("model")), fail)
                try:
                    if delay:
                        time.sleep(delay)
                    if fail == 401:
                        self._send(401, {"error": {"message": "Incorrect API key provided.", "type": "invalid_request_error",
                                                   "code": "invalid_api_key"}})  # fmt: skip
                        return
                    if fail:
                        self._send(fail, {"error": {"message": "the fake provider was told to fail", "type": "server_error", "code": None}})
                        return
                    text = fake.reply_for(body)
                    message: dict[str, Any] = {"role": "assistant", "content": text}
                    calls = fake.tool_calls_for(body)
                    if calls:
                        message = {"role": "assistant", "content": fake.tool_text, "tool_calls": calls}
                    prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in body.get("messages", []))
                    completion_tokens = len(text.split())
                    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                             "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip
                    if body.get("stream"):
                        self._stream(body, fake.tool_text if calls else text, calls, usage)
                        return
                    self._send(
                        200,
                        {
                            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
                            "object": "chat.completion",
                            "created": int(time.time()),
                            "model": body.get("model", "fake"),
                            "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls" if calls else "stop"}],
                            "usage": usage,
                        },
                    )
                finally:
                    with fake._lock:
                        fake.in_flight -= 1

            def _stream(self, body: dict[str, Any], text: str | None, calls: list[dict[str, Any]], usage: dict[str, int]) -> None:
                """Server-sent events as OpenAI sends them, chunked, one chunk every `stream_delay` seconds."""
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                head = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion.chunk", "created": int(time.time()),
                        "model": body.get("model", "fake")}  # fmt: skip
                deltas: list[dict[str, Any]] = [{"role": "assistant", "content": ""}]
                if text is not None:
                    deltas += [{"content": word} for word in re.findall(r"\s*\S+", text)]
                for n, call in enumerate(calls):
                    arguments = call["function"]["arguments"]
                    deltas.append({"tool_calls": [{"index": n, "id": call["id"], "type": "function",
                                                   "function": {"name": call["function"]["name"], "arguments": ""}}]})  # fmt: skip
                    deltas += [{"tool_calls": [{"index": n, "function": {"arguments": arguments[i : i + 8]}}]}
                               for i in range(0, len(arguments), 8)]  # fmt: skip
                events = [{**head, "choices": [{"index": 0, "delta": d, "finish_reason": None}]} for d in deltas]
                events.append({**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls" if calls else "stop"}]})
                if (body.get("stream_options") or {}).get("include_usage"):
                    events.append({**head, "choices": [], "usage": usage})
                try:
                    for n, event in enumerate(events):
                        if n and fake.stream_delay:
                            time.sleep(fake.stream_delay)
                        self._chunk(b"data: " + json.dumps(event).encode() + b"\n\n")
                    self._chunk(b"data: [DONE]\n\n")
                    self._chunk(b"")
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True  # the client went away mid-stream (a killed worker)

            def _chunk(self, data: bytes) -> None:
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()

            def _send(self, status: int, payload: dict[str, Any]) -> None:
                self.send_bytes(status, "application/json", json.dumps(payload).encode())

        self._server = serve(Handler, port, "fake-llm")
        return self

    def stop(self) -> None:
        shutdown(self._server)


def main() -> None:
    parser = argparse.ArgumentParser(description="Run the fake OpenAI-compatible LLM server.")
    parser.add_argument("--port", type=int, default=8999)
    parser.add_argument("--delay", type=float, default=0.0, help="seconds each answer takes")
    parser.add_argument("--stream-delay", type=float, default=0.0, help="seconds between two streamed chunks")
    args = parser.parse_args()
    fake = FakeLLM(delay=args.delay, stream_delay=args.stream_delay).start(args.port)
    print(f"fake LLM at {fake.url} (delay {args.delay}s); Ctrl-C to stop", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        fake.stop()


if __name__ == "__main__":
    main()
