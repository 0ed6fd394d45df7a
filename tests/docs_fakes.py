"""Local stand-ins that let the documentation's Python blocks run offline (see the root conftest.py).

* :class:`Clock`: a settable clock for stand-ins whose behaviour depends on time.
* :class:`ScriptedModel` and :func:`serve_model`: an HTTP server speaking just enough of the OpenAI
  Chat Completions and Responses APIs and of the Anthropic Messages API for the agent loops in
  docs/frameworks/: asked first, the "model" calls the tool ``charge`` with
  ``{"customer": "cus_123", "amount": 100}`` (under a new call id every time); once it sees the tool's
  result it answers with text. The SDKs reach it through ``OPENAI_BASE_URL`` / ``ANTHROPIC_BASE_URL``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["Clock", "ScriptedModel", "serve_model"]

TOOL_ARGS = {"customer": "cus_123", "amount": 100}


class Clock:
    """Wall-clock seconds, moved forward by :meth:`advance` (thread-safe enough for tests)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


class ScriptedModel:
    """Answers model requests: first a call of the tool ``charge``, then, given its result, text."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self._ids = itertools.count(1)

    def answer(self, path: str, request: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        self.requests.append((path, request))
        n = next(self._ids)
        if path.endswith("/chat/completions"):
            done = any(m.get("role") == "tool" for m in request.get("messages", []))
            message: dict[str, Any] = {"role": "assistant", "content": None}
            if done:
                message["content"] = "The customer was charged."
            else:
                message["tool_calls"] = [
                    {
                        "id": f"call_{n}",
                        "type": "function",
                        "function": {"name": "charge", "arguments": json.dumps(TOOL_ARGS)},
                    }
                ]
            return 200, {
                "id": f"chatcmpl-{n}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": request.get("model", "model"),
                "choices": [{"index": 0, "finish_reason": "stop" if done else "tool_calls", "message": message}],
            }
        if path.endswith("/responses"):
            items = request.get("input", [])
            done = isinstance(items, list) and any(
                isinstance(i, dict) and i.get("type") == "function_call_output" for i in items
            )
            if done:
                output: list[dict[str, Any]] = [
                    {
                        "type": "message",
                        "id": f"msg_{n}",
                        "role": "assistant",
                        "status": "completed",
                        "content": [{"type": "output_text", "text": "The customer was charged.", "annotations": []}],
                    }
                ]
            else:
                output = [
                    {
                        "type": "function_call",
                        "id": f"fc_{n}",
                        "call_id": f"call_{n}",
                        "name": "charge",
                        "arguments": json.dumps(TOOL_ARGS),
                        "status": "completed",
                    }
                ]
            return 200, {
                "id": f"resp_{n}",
                "object": "response",
                "created_at": int(time.time()),
                "model": request.get("model", "model"),
                "output": output,
                "parallel_tool_calls": True,
                "tool_choice": "auto",
                "tools": [],
                "status": "completed",
            }
        if path.endswith("/messages"):
            last = request.get("messages", [{}])[-1]
            content = last.get("content")
            done = isinstance(content, list) and any(
                isinstance(b, dict) and b.get("type") == "tool_result" for b in content
            )
            blocks: list[dict[str, Any]]
            if done:
                blocks = [{"type": "text", "text": "The customer was charged."}]
            else:
                blocks = [
                    {"type": "text", "text": "I'll charge the customer."},
                    {"type": "tool_use", "id": f"toolu_{n}", "name": "charge", "input": TOOL_ARGS},
                ]
            return 200, {
                "id": f"msg_{n}",
                "type": "message",
                "role": "assistant",
                "model": request.get("model", "model"),
                "content": blocks,
                "stop_reason": "end_turn" if done else "tool_use",
                "stop_sequence": None,
                "usage": {"input_tokens": 1, "output_tokens": 1},
            }
        return 404, {"error": {"message": f"the stand-in does not serve {path}"}}


@contextlib.contextmanager
def serve_model(model: ScriptedModel) -> Iterator[str]:
    """Serve ``model`` on a free port of 127.0.0.1; yields the base URL (``http://127.0.0.1:PORT``)."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("content-length") or 0))
            try:
                request = json.loads(raw or b"{}")
            except ValueError:
                request = {}
            status, body = model.answer(self.path.split("?")[0], request)
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
