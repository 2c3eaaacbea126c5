"""Loading a VLM judge's model and processor (:class:`~noisealign.judges.vlm.VLMJudge`), and
reading the answer tokens out of its vocabulary."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor
from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor
from transformers.processing_utils import ProcessorMixin

from ..errors import JudgeError


class ImageOnlyQwenVLProcessor(Qwen2VLProcessor):
    """Qwen2-VL / Qwen2.5-VL processor without the video processor.

    The stock processors insist on a video processor, which needs torchvision; images only
    need the image processor and the tokenizer. The image path of Qwen2.5-VL's processor is
    the same as Qwen2-VL's, so one class serves both.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        # Qwen2VLProcessor passes (image_processor, tokenizer, video_processor) on; the mixin
        # keeps only the attributes named in *this* signature, so the None is dropped.
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template)


# Architectures whose stock processor cannot be built without torchvision; others: AutoProcessor.
PROCESSORS: dict[str, type[ProcessorMixin]] = {
    "qwen2_vl": ImageOnlyQwenVLProcessor,
    "qwen2_5_vl": ImageOnlyQwenVLProcessor,
}


def answer_token_ids(tokenizer, word: str) -> list[int]:
    """Ids of every non-special vocabulary token that reads ``word`` up to case and space."""
    special = set(tokenizer.all_special_tokens)
    ids = [
        idx
        for token, idx in tokenizer.get_vocab().items()
        if word in token.lower()
        and token not in special
        and tokenizer.convert_tokens_to_string([token]).strip().lower() == word
    ]
    if not ids:
        raise JudgeError(f"the VLM's vocabulary has no token for the answer '{word}'")
    return sorted(ids)


def load_vlm(
    model: str, dtype: torch.dtype, device: torch.device, trust_remote_code: bool = False
) -> tuple[ProcessorMixin, torch.nn.Module]:
    """The processor (its tokenizer padding on the left) and the eval-mode model on ``device``.

    A ``model`` that is neither a local folder nor a reachable hub id is a :class:`JudgeError`.
    """
    try:
        model_type = AutoConfig.from_pretrained(
            model, trust_remote_code=trust_remote_code
        ).model_type
    except (OSError, ValueError) as exc:  # missing folder, unreachable or invalid hub id
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise JudgeError(
            f"cannot find the judge's VLM '{model}': not a local model folder, and the hub "
            f"lookup failed ({first}); set judge_kwargs.model to an existing folder or a "
            "reachable or cached hub id"
        ) from exc
    processor_cls = PROCESSORS.get(model_type, AutoProcessor)
    processor = processor_cls.from_pretrained(model, trust_remote_code=trust_remote_code)
    # Left padding puts every sequence's last token at position -1.
    processor.tokenizer.padding_side = "left"
    vlm = (
        AutoModelForImageTextToText.from_pretrained(
            model, dtype=dtype, trust_remote_code=trust_remote_code
        )
        .to(device)
        .eval()
    )
    return processor, vlm
