"""A judge from any ``transformers`` image-text-to-text VLM with a chat template.

Two ways to read token-level feedback out of the same model (``method``):

* ``"concepts"`` (VQAScore, Lin et al. 2024, arXiv 2404.01291): one yes/no question per
  concept and one for the whole prompt. The score is P(yes) from the logits at the answer
  position, restricted to the answer tokens: every vocabulary token that reads ``yes`` or
  ``no`` up to case and surrounding space is collected, each class is pooled with
  logsumexp, and ``P(yes) = sigmoid(lse_yes - lse_no)``. The whole-prompt question gives the
  overall score; each concept's score lands on its character spans.
* ``"caption"`` (caption likelihood): the prompt is teacher-forced as the assistant's answer
  to ``caption_instruction``, once with the image and once without. Per answer token the
  pointwise mutual information ``PMI = log p(token | image, prefix) - log p(token | prefix)``
  says how much the image supports that token. Part score = ``sigmoid(PMI)`` on the token's
  character span of the prompt (0.5 = the image is neutral about it); a concept's score is
  the mean part score of the tokens overlapping its spans (the overall score when none
  does); overall = ``sigmoid(mean PMI)`` over all answer tokens.

Everything returned is in prompt character coordinates; callers map it onto the diffusion
model's tokens with :func:`~noisealign.judges.base.spans_to_token_scores`.

Example:
    >>> judge = VLMJudge("Qwen/Qwen2-VL-2B-Instruct", method="concepts")  # doctest: +SKIP
    >>> judge.score([image], ["a red circle left of a blue square"])[0].overall  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from accelerate import PartialState
from PIL import Image

from ..errors import JudgeError
from .base import Concept, Feedback
from .concepts import resolve_concepts
from .vlm_loading import answer_token_ids, load_vlm

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
METHODS = ("concepts", "caption")


def _find_last(row: list[int], needle: list[int]) -> int:
    """Start of the last occurrence of ``needle`` in ``row``, or -1."""
    for start in range(len(row) - len(needle), -1, -1):
        if row[start : start + len(needle)] == needle:
            return start
    return -1


class VLMJudge:
    """Token-level feedback from a VLM; see the module docstring for the two methods.

    Args:
        model: hub id or local folder of an image-text-to-text model with a chat template.
        method: ``"concepts"`` (yes/no questions) or ``"caption"`` (caption PMI).
        torch_dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        device: torch device; ``None`` is this process's (``accelerate.PartialState().device``).
        batch_size: (image, text) sequences per forward pass.
        question: the yes/no question; ``{text}`` is replaced by the concept or prompt.
        caption_instruction: the user turn that the prompt answers in ``"caption"``.
        trust_remote_code: passed to ``from_pretrained``; only for models you trust.
    """

    def __init__(
        self,
        model: str,
        method: str = "concepts",
        torch_dtype: str = "float32",
        device: str | None = None,
        batch_size: int = 8,
        question: str = 'Does this figure show "{text}"? Please answer yes or no.',
        caption_instruction: str = "Describe the image.",
        trust_remote_code: bool = False,
    ) -> None:
        if method not in METHODS:
            raise JudgeError(f"VLMJudge method must be one of {METHODS}, got '{method}'")
        if torch_dtype not in DTYPES:
            raise JudgeError(
                f"VLMJudge torch_dtype must be one of {sorted(DTYPES)}, got '{torch_dtype}'"
            )
        if "{text}" not in question:
            raise JudgeError("VLMJudge question must contain '{text}'")
        self.method, self.question, self.caption_instruction = method, question, caption_instruction
        self.batch_size = batch_size
        # PartialState is this rank's device once an Accelerator exists (cuda:<rank> on
        # 8 GPUs, not cuda:0), and the CPU without a GPU; stages build judges after their
        # Accelerator, because a PartialState made first ignores ACCELERATE_USE_CPU
        self.device = torch.device(device or PartialState().device)
        self.processor, self.model = load_vlm(
            model, DTYPES[torch_dtype], self.device, trust_remote_code
        )
        self.tokenizer = self.processor.tokenizer
        self.yes_ids = answer_token_ids(self.tokenizer, "yes")
        self.no_ids = answer_token_ids(self.tokenizer, "no")
        self.name = f"vlm:{Path(model.rstrip('/')).name}:{method}"

    def __repr__(self) -> str:
        return f"VLMJudge(name={self.name!r}, device={self.device})"

    # ---- shared -----------------------------------------------------------------------

    def _chat(self, text: str, with_image: bool, answer: str | None = None) -> str:
        content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": text}]
        messages = [{"role": "user", "content": content}]
        if answer is not None:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        return self.processor.apply_chat_template(
            messages, add_generation_prompt=answer is None, tokenize=False
        )

    def _inputs(self, images: Sequence[Image.Image] | None, texts: list[str]):
        rgb = [image.convert("RGB") for image in images] if images is not None else None
        inputs = self.processor(images=rgb, text=texts, padding=True, return_tensors="pt")
        return inputs.to(self.device, dtype=self.model.dtype)

    # ---- method "concepts" --------------------------------------------------------------

    @torch.no_grad()
    def yes_probability(self, images: Sequence[Image.Image], texts: Sequence[str]) -> torch.Tensor:
        """P(yes) for each (image, text) pair, the question filled with ``text``: (N,) float32."""
        chats = [self._chat(self.question.format(text=text), with_image=True) for text in texts]
        logits = self.model(**self._inputs(images, chats), logits_to_keep=1).logits[:, -1].float()
        lse_yes = torch.logsumexp(logits[:, self.yes_ids], dim=-1)
        lse_no = torch.logsumexp(logits[:, self.no_ids], dim=-1)
        return torch.sigmoid(lse_yes - lse_no).cpu()

    def _score_concepts(self, images, prompts, concepts) -> list[Feedback]:
        pairs = [
            (i, text)
            for i, prompt in enumerate(prompts)
            for text in [prompt] + [c.text for c in concepts[i]]
        ]
        probs: list[float] = []
        for start in range(0, len(pairs), self.batch_size):
            chunk = pairs[start : start + self.batch_size]
            probs += self.yes_probability(
                [images[i] for i, _ in chunk], [t for _, t in chunk]
            ).tolist()
        feedback, cursor = [], 0
        for sample_concepts in concepts:
            overall, scores = probs[cursor], probs[cursor + 1 : cursor + 1 + len(sample_concepts)]
            cursor += 1 + len(sample_concepts)
            feedback.append(
                Feedback(overall=overall, concepts=with_scores(sample_concepts, scores))
            )
        return feedback

    # ---- method "caption" ---------------------------------------------------------------

    def _answer_tokens(
        self, prompt: str, row: list[int]
    ) -> tuple[list[int], list[tuple[int, int]], int]:
        """The prompt's tokens as they appear in the chat sequence ``row``, their spans and start.

        The prompt is tokenized alone (with offsets) and must be found verbatim in the chat
        sequence, which verifies that the offsets describe the tokens the model scores.
        Templates that put a space before the answer (LLaVA's ``ASSISTANT: ``) match the
        tokenization of ``" " + prompt`` instead; its offsets are shifted back by one.
        """
        for prefix in ("", " "):
            encoded = self.tokenizer(
                prefix + prompt, add_special_tokens=False, return_offsets_mapping=True
            )
            ids = encoded["input_ids"]
            start = _find_last(row, ids)
            if ids and start > 0:
                spans = [
                    (max(s - len(prefix), 0), max(e - len(prefix), 0))
                    for s, e in encoded["offset_mapping"]
                ]
                return ids, spans, start
        raise JudgeError(
            f"could not find the tokens of the prompt {prompt!r} in the VLM's chat sequence"
        )

    def _answer_logprobs(
        self, images, prompts: Sequence[str]
    ) -> list[tuple[torch.Tensor, list[tuple[int, int]]]]:
        """Per prompt: log p of each answer token, (T,) float32, and the tokens' spans.

        The user turn holds the image when ``images`` is given, else only the instruction.
        """
        chats = [
            self._chat(self.caption_instruction, images is not None, answer=p) for p in prompts
        ]
        inputs = self._inputs(images, chats)
        length = inputs["input_ids"].shape[1]
        found = [
            self._answer_tokens(p, row.tolist()) for p, row in zip(prompts, inputs["input_ids"])
        ]
        # Only the logits from the token before the earliest answer on are needed: with a
        # 150k vocabulary the full (B, L, V) tensor of an image sequence is gigabytes.
        keep = length - min(start for _, _, start in found) + 1
        logprobs = torch.log_softmax(
            self.model(**inputs, logits_to_keep=keep).logits.float(), dim=-1
        )
        out = []
        for row, (ids, spans, start) in enumerate(found):
            # kept logit j predicts sequence position length - keep + j + 1
            first = start - 1 - (length - keep)
            targets = torch.tensor(ids, device=logprobs.device)[:, None]
            token_logprobs = logprobs[row, first : first + len(ids)].gather(-1, targets)[:, 0]
            out.append((token_logprobs.cpu(), spans))
        return out

    @torch.no_grad()
    def caption_pmi(
        self, images: Sequence[Image.Image], prompts: Sequence[str]
    ) -> list[tuple[torch.Tensor, list[tuple[int, int]]]]:
        """Per prompt: PMI of each prompt token, (T,) float32, and the tokens' prompt spans."""
        with_image = self._answer_logprobs(images, prompts)
        without = self._answer_logprobs(None, prompts)
        pmis = []
        for (lp_img, spans), (lp_txt, spans_txt) in zip(with_image, without):
            if spans != spans_txt:
                raise JudgeError(
                    "the prompt tokenizes differently in the chats with and without the image"
                )
            pmis.append((lp_img - lp_txt, spans))
        return pmis

    def _score_caption(self, images, prompts, concepts) -> list[Feedback]:
        feedback = []
        for start in range(0, len(prompts), self.batch_size):
            chunk = slice(start, start + self.batch_size)
            for (pmi, spans), prompt, sample_concepts in zip(
                self.caption_pmi(images[chunk], prompts[chunk]), prompts[chunk], concepts[chunk]
            ):
                feedback.append(_caption_feedback(prompt, pmi, spans, sample_concepts))
        return feedback

    # ---- Judge protocol -----------------------------------------------------------------

    def score(
        self,
        images: Sequence[Image.Image],
        prompts: Sequence[str],
        concepts: Sequence[list[Concept] | None] | None = None,
    ) -> list[Feedback]:
        """Score B images against B prompts; see the module docstring for the definitions."""
        resolved = resolve_concepts(images, prompts, concepts)
        if self.method == "concepts":
            return self._score_concepts(list(images), list(prompts), resolved)
        return self._score_caption(list(images), list(prompts), resolved)


def _caption_feedback(
    prompt: str, pmi: torch.Tensor, spans: list[tuple[int, int]], concepts: list[Concept]
) -> Feedback:
    """Part scores sigmoid(PMI) on whitespace-trimmed token spans; concepts average their tokens."""
    parts = []
    for (start, end), score in zip(spans, torch.sigmoid(pmi).tolist()):
        while start < end and prompt[start].isspace():
            start += 1
        if end > start:
            parts.append((start, end, score))
    overall = torch.sigmoid(pmi.mean()).item()
    scores = []
    for concept in concepts:
        hits = [
            s for ps, pe, s in parts if any(min(pe, ce) > max(ps, cs) for cs, ce in concept.spans)
        ]
        scores.append(sum(hits) / len(hits) if hits else overall)
    return Feedback(overall=overall, concepts=with_scores(concepts, scores), parts=parts)


def with_scores(concepts: Sequence[Concept], scores: Sequence[float]) -> list[Concept]:
    """Copies of ``concepts`` carrying ``scores``; the caller's concepts are left unscored."""
    return [Concept(c.text, c.kind, list(c.spans), score) for c, score in zip(concepts, scores)]
