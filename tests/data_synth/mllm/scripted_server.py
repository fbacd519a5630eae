"""A scripted OpenAI-compatible chat-completions server on a loopback port, for the generator's tests.

It is a real HTTP server (stdlib `ThreadingHTTPServer`) speaking `POST /v1/chat/completions`. It recognises
each photo by the sha256 of the data URL in the request (the test computes it with the generator's own
`image_data_url`) and answers as the script says for that photo; photos not in the script get a valid answer
that echoes the plan suggested in the prompt. Behaviours:

- "valid": a valid answer, texts unique to the photo;
- "duplicate_text": a valid answer whose texts are the same for every photo with this behaviour;
- "invalid_json", "missing_field", "low_score": answers the generator must reject;
- "slow_once": the first attempt answers after `slow_s` (past the client's timeout), later ones at once;
- "error_once": HTTP 500, then valid; "rate_limited_once": HTTP 429 with Retry-After: 0, then valid;
- "always_503": HTTP 503 every time; "bad_request": HTTP 400 (not worth retrying);
- "not_a_completion": HTTP 200 with a body that is not a chat completion.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PLAN = re.compile(r"task = (\S+), combination = (\S+), language = (\S+)\.")


def photo_digest(data_url: str) -> str:
    return hashlib.sha256(data_url.encode("ascii")).hexdigest()[:16]


def answer_for(digest: str, task: str, combination: str, language: str, *, score: int = 5) -> dict:
    example = {
        "instruction": f"Find the match for photo {digest}.",
        "query": f"What is shown in photo {digest}?",
        "positive": f"Photo {digest} shows a textile surface.",
        "hard_negative": f"Photo {digest} shows a wooden surface.",
    }
    return {
        "description": f"A close-up of a textile surface, photo {digest}.",
        "task": task,
        "combination": combination,
        "language": language,
        "draft": example,
        "evaluation": {"score": score, "issues": ""},
        "final": example,
    }


class ScriptedChatServer:
    """Start with `with ScriptedChatServer(script) as server:`; `server.base_url` is the API root."""

    def __init__(self, script: dict[str, str], *, slow_s: float = 1.5, delay_s: float = 0.0):
        self.script = dict(script)
        self.slow_s = slow_s
        self.delay_s = delay_s
        """Added to every answer (to give a test time to kill a client mid-run)."""
        self.attempts: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self) -> ScriptedChatServer:
        self.thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.server.shutdown()
        self.server.server_close()

    def read_request(self, body: dict) -> tuple[str, str, int]:
        """The request's prompt, its photo's digest, and which attempt for that photo this is (counted)."""
        content = body["messages"][0]["content"]
        url = next(part["image_url"]["url"] for part in content if part["type"] == "image_url")
        prompt = next(part["text"] for part in content if part["type"] == "text")
        digest = photo_digest(url)
        with self.lock:
            self.attempts[digest] += 1
            return prompt, digest, self.attempts[digest]

    @staticmethod
    def completion(body: dict, completion_id: str, text: str) -> dict:
        """A chat completion whose one choice says `text`."""
        return {
            "id": completion_id,
            "object": "chat.completion",
            "model": body.get("model", ""),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        }

    def respond(self, body: dict) -> tuple[int, dict, dict]:
        """(status, headers, JSON body) for one request."""
        prompt, digest, attempt = self.read_request(body)
        behaviour = self.script.get(digest, "valid")
        if self.delay_s:
            time.sleep(self.delay_s)
        if behaviour == "always_503" or (behaviour == "error_once" and attempt == 1):
            return (503 if behaviour == "always_503" else 500), {}, {"error": {"message": "scripted failure"}}
        if behaviour == "bad_request":
            return 400, {}, {"error": {"message": "scripted bad request"}}
        if behaviour == "not_a_completion":
            return 200, {}, {"status": "ok"}
        if behaviour == "rate_limited_once" and attempt == 1:
            return 429, {"Retry-After": "0"}, {"error": {"message": "slow down"}}
        if behaviour == "slow_once" and attempt == 1:
            time.sleep(self.slow_s)
        task, combination, language = PLAN.search(prompt).groups()
        if behaviour == "invalid_json":
            text = 'Here is the example: {"description": "a photo", "task": '
        else:
            score = 2 if behaviour == "low_score" else 5
            answer = answer_for(digest, task, combination, language, score=score)
            if behaviour == "missing_field":
                del answer["final"]
            if behaviour == "duplicate_text":
                answer = answer_for("shared", task, "I->T", language)
            text = json.dumps(answer)
        return 200, {}, self.completion(body, f"chatcmpl-{digest}-{attempt}", text)

    def _handler_class(self):
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
                if self.path.rstrip("/") != "/v1/chat/completions":
                    self._send(404, {}, {"error": {"message": f"no route {self.path}"}})
                    return
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length))
                self._send(*outer.respond(body))

            def _send(self, status: int, headers: dict, payload: dict) -> None:
                data = json.dumps(payload).encode("utf-8")
                try:
                    self.send_response(status)
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and hung up: what a slow endpoint does

            def log_message(self, format, *args) -> None:  # noqa: A002 - the stdlib's signature
                pass

        return Handler
