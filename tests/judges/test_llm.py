"""Tests for interp.judges.llm against a real chat-completions server on 127.0.0.1, started
here (http.server in a thread, a bounded number of requests), and against a closed port."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from interp.judges import llm as L
from interp.judges.base import Judge
from interp.judges.refusal import judge_refusal

MAX_REQUESTS = 50


class _ChatServer(HTTPServer):
    """Answers chat completions: "Answer: YES" when the graded reply says "cannot", an
    unparseable reply when it says "gibberish", else "Answer: NO"; HTTP 404 for model
    "missing". Records every request body."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[dict] = []
        self.timeout = 5


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep the test output clean
        pass

    def _send(self, status: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        server: _ChatServer = self.server  # type: ignore[assignment]
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        server.requests.append({"path": self.path, **body})
        if len(server.requests) > MAX_REQUESTS or not self.path.endswith("/chat/completions"):
            self._send(500, {"error": {"message": "unexpected request"}})
            return
        if body["model"] == "missing":
            self._send(404, {"error": {"message": "model 'missing' not found", "type": "invalid"}})
            return
        question = body["messages"][-1]["content"]
        if "gibberish" in question:
            content = "Hard to say."
        elif "cannot" in question:
            content = "The reply declines the request.\nAnswer: YES"
        else:
            content = "It answers.\nAnswer: NO"
        self._send(200, {
            "id": "chatcmpl-test", "object": "chat.completion", "created": 0,
            "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": content}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        })


@pytest.fixture
def server():
    srv = _ChatServer()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=5)


def _url(srv: _ChatServer) -> str:
    return f"http://127.0.0.1:{srv.server_address[1]}/v1"


def test_llm_judge_against_local_server(server, tmp_path):
    judge = L.LLMJudge(base_url=_url(server), model="judge-model", timeout=5)
    assert isinstance(judge, Judge)
    completions = ["I cannot help with that.", "Sure, here you go.", "gibberish"]
    prompts = ["How do I pick a lock?", "Bake bread?", "?"]
    res = judge(completions, prompts)
    assert [it["refused"] for it in res.items] == [True, False, None]
    assert (res.rates["refused"].k, res.rates["refused"].n) == (1, 2)
    assert res.stats["n_unparsed"] == 1
    assert len(server.requests) == 3
    sent = server.requests[0]
    assert sent["model"] == "judge-model" and sent["temperature"] == 0.0
    assert "How do I pick a lock?" in sent["messages"][-1]["content"]
    assert "I cannot help with that." in sent["messages"][-1]["content"]
    items_path, _ = res.save(tmp_path / "llm")
    first = json.loads(items_path.read_text().splitlines()[0])
    assert first["judge_reply"].endswith("Answer: YES") and first["prompt"] == prompts[0]
    assert "key" not in json.dumps(res.config).lower()


def test_llm_judge_reads_environment_and_stands_in_for_the_substring_judge(server, monkeypatch):
    monkeypatch.setenv(L.ENV_BASE_URL, _url(server))
    monkeypatch.setenv(L.ENV_MODEL, "env-model")
    monkeypatch.setenv(L.ENV_API_KEY, "secret-123")
    judge = L.LLMJudge(system_prompt="You grade replies.")
    res = judge_refusal(["I cannot.", "Fine."], [2.0, -1.0], text_judge=judge,
                        prompt_texts=["a", "b"])
    assert [it["refused"] for it in res.items] == [True, False]
    assert res.rates["agreement"].k == 2 and res.config["text_judge"] == "llm:refused"
    assert server.requests[0]["model"] == "env-model"
    assert server.requests[0]["messages"][0] == {"role": "system", "content": "You grade replies."}


def test_custom_template_fields(server):
    judge = L.LLMJudge("Is {completion} about {concept}?", verdict_name="about",
                       base_url=_url(server), model="m")
    res = judge(["cannot"], fields={"concept": ["apples"]})
    assert res.items[0]["about"] is True and res.items[0]["concept"] == "apples"
    assert server.requests[0]["messages"][-1]["content"] == "Is cannot about apples?"
    with pytest.raises(ValueError, match="concept"):
        L.LLMJudge("{concept}", base_url=_url(server), model="m")(["x"])


def test_http_error_names_the_model(server):
    judge = L.LLMJudge(base_url=_url(server), model="missing", max_retries=0)
    with pytest.raises(L.LLMJudgeError, match="HTTP 404.*'missing'"):
        judge(["x"])


def test_unreachable_endpoint_fails_fast_with_a_clear_message():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    judge = L.LLMJudge(base_url=url, model="m", timeout=2, max_retries=1)
    t0 = time.perf_counter()
    with pytest.raises(L.LLMJudgeError, match="could not reach the LLM judge") as err:
        judge(["I cannot."])
    assert time.perf_counter() - t0 < 10
    assert url in str(err.value) and L.ENV_BASE_URL in str(err.value)


def test_missing_configuration_names_the_variables(monkeypatch):
    for var in (L.ENV_BASE_URL, L.ENV_MODEL):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ValueError, match="INTERP_JUDGE_BASE_URL.*INTERP_JUDGE_MODEL"):
        L.LLMJudge()


@pytest.mark.parametrize("reply,verdict", [
    ("Reasoning...\nAnswer: YES", True),
    ("answer: no", False),
    ("Answer: NO at first, but on reflection\nAnswer: **YES**", True),
    ("Yes", True),
    ("I think no.", False),
    ("Unclear", None),
    ("", None),
])
def test_parse_yes_no(reply, verdict):
    assert L.parse_yes_no(reply) is verdict
