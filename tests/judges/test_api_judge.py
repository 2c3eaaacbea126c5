"""OpenAIJudge against a fake OpenAI-compatible server on 127.0.0.1: values, retries, key
hygiene."""

from __future__ import annotations

import base64
import io
import json
import logging
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from noisealign.errors import JudgeError
from noisealign.judges import build_judge, split_concepts
from noisealign.judges.api import OpenAIJudge, yes_probability_from_logprobs

SENTINEL = "sk-test-SENTINEL-4f1c9e"  # a fake key; must never show up anywhere but the header
ENV = "NOISEALIGN_TEST_API_KEY"


class FakeAPI:
    """Shared state of the fake server: scripted failures, P(yes) per question, recorded
    requests."""

    def __init__(self) -> None:
        # per request, popped first: "500", "400", "sleep", "garbage"; then "ok"
        self.script: list[str] = []
        self.p_yes: dict[str, float] = {}
        self.requests: list[dict] = []
        self.sleep = 0.5


def _reply(p_yes: float) -> dict:
    # The answer tokens as APIs return them: several casings / spaces, and an unrelated token.
    top = [
        {"token": "Yes", "logprob": math.log(0.8 * p_yes)},
        {"token": " yes", "logprob": math.log(0.1 * p_yes)},
        {"token": "No", "logprob": math.log(0.9 * (1 - p_yes))},
        {"token": "Maybe", "logprob": math.log(0.05)},
    ]
    return {
        "choices": [
            {
                "message": {"content": "Yes"},
                "logprobs": {
                    "content": [{"token": "Yes", "logprob": top[0]["logprob"], "top_logprobs": top}]
                },
            }
        ]
    }


def _handler(api: FakeAPI) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # keep test output clean
            pass

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            api.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
            action = api.script.pop(0) if api.script else "ok"
            if action == "sleep":
                time.sleep(api.sleep)
            if action in ("500", "400"):
                self.send_response(int(action))
                self.end_headers()
                return
            question = body["messages"][0]["content"][1]["text"]
            text = question.split('"')[1]
            payload = json.dumps(_reply(api.p_yes.get(text, 0.5))).encode()
            if action == "garbage":
                payload = b"<html>502 Bad Gateway</html>"
            try:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
            except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                pass

    return Handler


@pytest.fixture(scope="module")
def server():
    api = FakeAPI()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(api))
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield api, f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def api(server, monkeypatch):
    state, url = server
    state.script, state.p_yes, state.requests = [], {}, []
    monkeypatch.setenv(ENV, SENTINEL)
    for proxy in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):  # reach 127.0.0.1 directly
        monkeypatch.delenv(proxy, raising=False)
    return state, url


@pytest.fixture
def image() -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 24, 3), dtype=np.uint8))


def _judge(url: str, **kwargs) -> OpenAIJudge:
    return OpenAIJudge("fake-vlm", base_url=url, api_key_env=ENV, backoff=0.01, **kwargs)


def test_p_yes_from_top_logprobs_and_request_content(api, image):
    state, url = api
    prompt = "a red circle left of a blue square"
    state.p_yes = {prompt: 0.7, "red circle": 0.9, "blue square": 0.2}
    feedback = _judge(url).score([image], [prompt])[0]
    # yes mass 0.9·p, no mass 0.9·(1-p): renormalised P(yes) is p exactly
    assert feedback.overall == pytest.approx(0.7)
    concepts = split_concepts(prompt)
    assert [(c.text, c.spans) for c in feedback.concepts] == [(c.text, c.spans) for c in concepts]
    assert [c.score for c in feedback.concepts] == pytest.approx([0.9, 0.2, 0.7])

    assert len(state.requests) == 1 + len(concepts)
    request = state.requests[0]
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["Authorization"] == f"Bearer {SENTINEL}"
    body = request["body"]
    assert body["model"] == "fake-vlm" and body["max_tokens"] == 1
    assert body["logprobs"] is True and body["top_logprobs"] == 20
    content = body["messages"][0]["content"]
    assert content[1]["text"] == f'Does this figure show "{prompt}"? Please answer yes or no.'
    data_url = content[0]["image_url"]["url"]
    assert data_url.startswith("data:image/png;base64,")
    sent = Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1])))
    assert np.array_equal(np.asarray(sent), np.asarray(image))


def test_retry_after_500_then_success(api, image, caplog):
    state, url = api
    state.script = ["500", "500"]
    state.p_yes = {"a cat": 0.25}
    with caplog.at_level(logging.DEBUG):
        feedback = _judge(url, max_retries=3).score([image], ["a cat"], [[]])[0]
    assert feedback.overall == pytest.approx(0.25)
    assert len(state.requests) == 3
    assert "HTTP 500" in caplog.text and "retry 2/3" in caplog.text
    assert SENTINEL not in caplog.text


def test_timeout_raises_after_retries(api, image, caplog):
    state, url = api
    state.script = ["sleep"] * 3
    judge = _judge(url, timeout=0.1, max_retries=2)
    with (
        caplog.at_level(logging.DEBUG),
        pytest.raises(JudgeError, match="failed after 3 attempts") as error,
    ):
        judge.score([image], ["a cat"], [[]])
    assert len(state.requests) == 3
    assert SENTINEL not in str(error.value) + repr(error.value) + caplog.text


def test_client_error_is_not_retried(api, image):
    state, url = api
    state.script = ["400"]
    with pytest.raises(JudgeError, match="HTTP 400") as error:
        _judge(url).score([image], ["a cat"], [[]])
    assert len(state.requests) == 1 and SENTINEL not in str(error.value)


def test_key_never_in_repr_name_or_attributes(api):
    judge = _judge(api[1])
    assert SENTINEL not in repr(judge) + judge.name + str(vars(judge))
    assert ENV in repr(judge)


def test_missing_env_var_names_the_variable(monkeypatch):
    monkeypatch.delenv("NOISEALIGN_UNSET_KEY", raising=False)
    with pytest.raises(JudgeError, match="NOISEALIGN_UNSET_KEY"):
        OpenAIJudge("fake-vlm", api_key_env="NOISEALIGN_UNSET_KEY")
    with pytest.raises(JudgeError, match="NOISEALIGN_UNSET_KEY"):
        build_judge("openai", model="fake-vlm", api_key_env="NOISEALIGN_UNSET_KEY")


def test_yes_probability_from_logprobs():
    top = [
        {"token": "YES.", "logprob": math.log(0.3)},
        {"token": " no", "logprob": math.log(0.1)},
        {"token": "Nope", "logprob": math.log(0.5)},
    ]
    assert yes_probability_from_logprobs(top) == pytest.approx(0.75)
    with pytest.raises(JudgeError, match="neither 'yes' nor 'no'"):
        yes_probability_from_logprobs([{"token": "Maybe", "logprob": -0.1}])


def test_non_json_reply_is_a_judge_error(api, image):
    state, url = api
    state.script = ["garbage"]
    with pytest.raises(JudgeError, match="non-JSON"):
        _judge(url).score([image], ["a cat"], [[]])
