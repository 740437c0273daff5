"""A scripted OpenAI-compatible chat server on 127.0.0.1, for tests and dry runs.

``metarl propose`` speaks the OpenAI chat-completions API. This server answers it with
proposals written in advance, so the whole loop (client, retries, sandbox, resume) can be
exercised without a model and without a network::

    with ScriptedLLMServer([answer(code=GOOD), "not json", Fail(429, times=2), ...]) as srv:
        propose(ProposeConfig(..., base_url=srv.url))

The reply to a request is chosen by the number of assistant messages already in the
conversation it sends (the first request gets ``script[0]``), so a resumed conversation gets
the same answers as an uninterrupted one. Past the end of the script the last entry repeats.
A :class:`Fail` entry answers with an HTTP error ``times`` times for that position, then
with its ``then`` answer. Every request body is kept in ``requests``.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Fail:
    """Answer with HTTP ``status`` for the first ``times`` requests at this position."""

    status: int
    times: int = 1
    then: str = ""


def answer(code: str, name: str = "proposal", thought: str = "") -> str:
    """A well-formed proposal: the JSON object the loop asks the model for."""
    return json.dumps({"thought": thought or f"try {name}", "name": name, "code": code})


class ScriptedLLMServer:
    def __init__(self, script: list, port: int = 0, model: str = "scripted"):
        if not script:
            raise ValueError("the script needs at least one answer")
        self.script, self.model = list(script), model
        self.requests: list[dict] = []
        self.failures: dict[int, int] = {}
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def start(self) -> ScriptedLLMServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def reply_for(self, body: dict) -> tuple[int, str]:
        """(HTTP status, assistant text) for a chat-completions request body."""
        position = sum(1 for m in body.get("messages", []) if m.get("role") == "assistant")
        entry = self.script[min(position, len(self.script) - 1)]
        if isinstance(entry, Fail):
            with self._lock:
                seen = self.failures.get(position, 0)
                self.failures[position] = seen + 1
            if seen < entry.times:
                return entry.status, ""
            return 200, entry.then
        return 200, entry

    def _handler(server):  # noqa: N805 - the server object, closed over by the handler
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _json(self, status: int, obj: dict) -> None:
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if status == 429:
                    self.send_header("Retry-After", "0")
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path.rstrip("/").endswith("/models"):
                    self._json(200, {"object": "list", "data": [
                        {"id": server.model, "object": "model", "owned_by": "metarl"}]})
                else:
                    self._json(404, {"error": {"message": f"no route {self.path}"}})

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                try:
                    body = json.loads(self.rfile.read(length) or b"{}")
                except json.JSONDecodeError:
                    self._json(400, {"error": {"message": "request body is not JSON"}})
                    return
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    self._json(404, {"error": {"message": f"no route {self.path}"}})
                    return
                with server._lock:
                    server.requests.append(body)
                status, text = server.reply_for(body)
                if status != 200:
                    kind = "rate_limit_exceeded" if status == 429 else "server_error"
                    self._json(status, {"error": {"message": f"scripted {status}",
                                                  "type": kind, "code": kind}})
                    return
                self._json(200, {
                    "id": f"chatcmpl-{len(server.requests)}", "object": "chat.completion",
                    "created": 0, "model": body.get("model", server.model),
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": text}}],
                    "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}})

        return Handler
