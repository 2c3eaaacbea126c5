"""A yes/no judge behind an OpenAI-compatible chat-completions API, read from answer logprobs.

Per question (the whole prompt for the overall score, then each concept) it sends the image
as a base64 PNG data URL with ``max_tokens=1, logprobs=True, top_logprobs=20`` and takes

    P(yes) = Σ_{t ∈ yes-variants} p(t) / (Σ_{t ∈ yes-variants} p(t) + Σ_{t ∈ no-variants} p(t))

over the first answer token's top logprobs, where the variants are the tokens that read
``yes`` / ``no`` up to case, surrounding whitespace and a trailing full stop. This is the
VQAScore of :mod:`noisealign.judges.vlm` restricted to what the API exposes (the top 20
tokens); a reply in which neither class appears cannot be scored and raises.

The API key is read from the environment variable named by ``api_key_env`` at request time
and is never stored on the judge, logged, or written into ``repr``, ``name`` or errors. Only
the standard library is used (``urllib``), so the judge adds no dependency.

Example:
    >>> judge = OpenAIJudge("gpt-4o-mini")  # doctest: +SKIP  (needs OPENAI_API_KEY)
    >>> judge.score([image], ["a red circle"])[0].overall  # doctest: +SKIP
"""

from __future__ import annotations

import base64
import io
import json
import logging
import math
import os
import time
import urllib.error
import urllib.request
from collections.abc import Sequence

from PIL import Image

from ..errors import JudgeError
from .base import Concept, Feedback
from .concepts import resolve_concepts

logger = logging.getLogger(__name__)

YES, NO = "yes", "no"
RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}


def image_data_url(image: Image.Image) -> str:
    """The image as a ``data:image/png;base64,...`` URL."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def yes_probability_from_logprobs(top_logprobs: Sequence[dict]) -> float:
    """P(yes) from a chat-completions ``top_logprobs`` list of ``{"token", "logprob"}``."""
    mass = {YES: 0.0, NO: 0.0}
    for entry in top_logprobs:
        word = entry["token"].strip().rstrip(".").lower()
        if word in mass:
            mass[word] += math.exp(entry["logprob"])
    if mass[YES] + mass[NO] == 0.0:
        tokens = [entry["token"] for entry in top_logprobs]
        raise JudgeError(f"neither 'yes' nor 'no' among the API's top answer tokens {tokens}")
    return mass[YES] / (mass[YES] + mass[NO])


class OpenAIJudge:
    """VQAScore-style judge from an OpenAI-compatible API's answer logprobs.

    Args:
        model: the API's model name, e.g. ``"gpt-4o-mini"``.
        base_url: API root; ``/chat/completions`` is appended.
        api_key_env: name of the environment variable holding the key (never the key itself).
        timeout: seconds per HTTP request.
        max_retries: retries after the first attempt on timeouts, connection errors, 429, 5xx.
        backoff: seconds before the first retry; doubled for each further retry.
        question: the yes/no question; ``{text}`` is replaced by the concept or prompt.
    """

    def __init__(
        self,
        model: str,
        base_url: str = "https://api.openai.com/v1",
        api_key_env: str = "OPENAI_API_KEY",
        timeout: float = 30.0,
        max_retries: int = 3,
        backoff: float = 1.0,
        question: str = 'Does this figure show "{text}"? Please answer yes or no.',
    ) -> None:
        if "{text}" not in question:
            raise JudgeError("OpenAIJudge question must contain '{text}'")
        self.model, self.api_key_env, self.question = model, api_key_env, question
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.timeout, self.max_retries, self.backoff = timeout, max_retries, backoff
        self.name = f"openai:{model}"
        self._api_key()  # fail at construction, not after the first image is generated

    def __repr__(self) -> str:
        return (
            f"OpenAIJudge(model={self.model!r}, url={self.url!r}, api_key_env={self.api_key_env!r})"
        )

    def _api_key(self) -> str:
        key = os.environ.get(self.api_key_env)
        if not key:
            raise JudgeError(
                f"the API judge needs an API key in the environment variable {self.api_key_env}, "
                "which is not set"
            )
        return key

    def _request(self, image_url: str, text: str) -> urllib.request.Request:
        body = {
            "model": self.model,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": image_url}},
                        {"type": "text", "text": self.question.format(text=text)},
                    ],
                }
            ],
            "max_tokens": 1,
            "temperature": 0,
            "logprobs": True,
            "top_logprobs": 20,
        }
        return urllib.request.Request(
            self.url,
            data=json.dumps(body).encode("utf-8"),
            headers={
                "Content-Type": "application/json",
                "Authorization": f"Bearer {self._api_key()}",
            },
            method="POST",
        )

    def _post(self, image_url: str, text: str) -> dict:
        """POST one question, retrying transient failures with exponential backoff."""
        for attempt in range(self.max_retries + 1):
            try:
                with urllib.request.urlopen(
                    self._request(image_url, text), timeout=self.timeout
                ) as response:
                    raw = response.read()
                try:
                    return json.loads(raw)
                except json.JSONDecodeError:
                    raise JudgeError(f"API judge {self.url} answered with non-JSON data") from None
            except urllib.error.HTTPError as exc:
                if exc.code not in RETRY_STATUS:
                    raise JudgeError(
                        f"API judge {self.url} answered HTTP {exc.code}: {exc.reason}"
                    ) from None
                failure = f"HTTP {exc.code}"
            except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
                failure = (
                    type(exc).__name__
                    if not isinstance(exc, urllib.error.URLError)
                    else f"URLError {exc.reason}"
                )
            if attempt < self.max_retries:
                delay = self.backoff * 2**attempt
                logger.warning(
                    "API judge %s: %s, retry %d/%d in %.1fs",
                    self.url,
                    failure,
                    attempt + 1,
                    self.max_retries,
                    delay,
                )
                time.sleep(delay)
        raise JudgeError(
            f"API judge {self.url} failed after {self.max_retries + 1} attempts: {failure}"
        )

    def yes_probability(self, image: Image.Image, text: str) -> float:
        """P(yes) for one image and one question text."""
        return self._yes(image_data_url(image), text)

    def score(
        self,
        images: Sequence[Image.Image],
        prompts: Sequence[str],
        concepts: Sequence[list[Concept] | None] | None = None,
    ) -> list[Feedback]:
        """Score B images: the whole prompt's P(yes) is the overall score, each concept's its
        score."""
        feedback = []
        for image, prompt, resolved in zip(
            images, prompts, resolve_concepts(images, prompts, concepts)
        ):
            url = image_data_url(image)
            overall = self._yes(url, prompt)
            scored = [
                Concept(c.text, c.kind, list(c.spans), self._yes(url, c.text)) for c in resolved
            ]
            feedback.append(Feedback(overall=overall, concepts=scored))
        return feedback

    def _yes(self, image_url: str, text: str) -> float:
        """P(yes) from the first answer token's top logprobs."""
        reply = self._post(image_url, text)
        try:
            top = reply["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
        except (KeyError, IndexError, TypeError):
            raise JudgeError(
                f"API judge {self.url} returned no answer logprobs (does the model support "
                "logprobs?)"
            ) from None
        return yes_probability_from_logprobs(top)
