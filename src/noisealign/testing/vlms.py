"""Tiny random vision-language models and CLIP, saved offline to folders the judges load.

Each builder writes a standard ``save_pretrained`` folder (config + safetensors + tokenizer +
image processor + chat template) so that ``VLMJudge(model=folder)`` and
``CLIPJudge(model=folder)`` take the same code path as they do for hub checkpoints. Weights
are random from a fixed seed; the tokenizer is a byte-level BPE generated here whose
vocabulary holds common prompt words (with and without a leading space), ``yes``/``no`` in
every casing, and the architecture's special tokens. Nothing downloads anything.

Example:
    >>> from noisealign.testing.vlms import build_tiny_vlm
    >>> folder = build_tiny_vlm("qwen2_vl", "/tmp/tiny-qwen2-vl")  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPConfig,
    CLIPModel,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.llava.processing_llava import LlavaProcessor
from transformers.models.llava_next.image_processing_pil_llava_next import (
    LlavaNextImageProcessorPil,
)
from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from ..pipelines.tokenizers import build_clip_tokenizer

WORDS = (
    "yes no Yes No YES NO a an the of in on and with is this that figure show does please answer "
    "or image photo picture describe red green blue yellow black white orange purple pink brown "
    "circle square triangle star cat dog car tree house bird left right above below next to "
    "behind front top two three one small big user assistant system you are helpful"
).split()

QWEN_SPECIALS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
LLAVA_SPECIALS = ("<pad>", "<s>", "</s>", "<image>")

# Abridged from Qwen/Qwen2-VL-2B-Instruct's template: same roles, markers and default system turn.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# llava-hf/llava-1.5-7b-hf's template without the {% generation %} markers.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' ' }}{% endfor %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# A large init scale so that random models give scores that differ between images and
# questions (at the usual 0.02 every P(yes) is 0.50 and comparisons in tests prove nothing).
INIT = 0.5
TEXT = dict(
    initializer_range=INIT,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
)


def _tiny_tokenizer(specials: tuple[str, ...], **special_roles: str) -> PreTrainedTokenizerFast:
    """A byte-level BPE (as Qwen's) in which every word of :data:`WORDS` is one token, bare and
    after a space."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    # The trainer is deterministic for a fixed corpus; a vocabulary larger than needed keeps
    # merging until each word is a single token. Unknown words still encode, byte by byte.
    trainer = trainers.BpeTrainer(
        vocab_size=5000,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=list(specials),
    )
    backend.train_from_iterator([*WORDS, *(" " + w for w in WORDS)], trainer=trainer)
    # padding_side in the constructor: batched yes/no questions read the last position.
    return PreTrainedTokenizerFast(tokenizer_object=backend, padding_side="left", **special_roles)


def _qwen_tokenizer() -> PreTrainedTokenizerFast:
    return _tiny_tokenizer(QWEN_SPECIALS, pad_token="<|endoftext|>", eos_token="<|im_end|>")


def _save_qwen(folder: Path, config_cls: type, model_cls: type, vision: dict) -> None:
    tokenizer = _qwen_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    text = dict(
        TEXT,
        vocab_size=len(tokenizer),
        bos_token_id=None,
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]},
    )
    config = config_cls(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    model_cls(config).save_pretrained(folder)
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    # 8-pixel patches merged 2x2: a 32x32 image becomes 4x4 patches, i.e. 4 image tokens.
    Qwen2VLImageProcessorPil(
        patch_size=8, merge_size=2, temporal_patch_size=2, min_pixels=32 * 32, max_pixels=32 * 32
    ).save_pretrained(folder)


def _qwen2_vl(folder: Path) -> None:
    vision = dict(
        initializer_range=INIT,
        depth=1,
        embed_dim=16,
        hidden_size=16,
        num_heads=2,
        mlp_ratio=2,
        patch_size=8,
        spatial_merge_size=2,
        temporal_patch_size=2,
    )
    _save_qwen(folder, Qwen2VLConfig, Qwen2VLForConditionalGeneration, vision)


def _qwen2_5_vl(folder: Path) -> None:
    vision = dict(
        initializer_range=INIT,
        depth=2,
        hidden_size=16,
        out_hidden_size=16,
        intermediate_size=32,
        num_heads=2,
        patch_size=8,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=32,
        fullatt_block_indexes=[1],
    )
    _save_qwen(folder, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, vision)


def _save_llava(folder: Path, next_: bool) -> None:
    """LLaVA-1.5, or LLaVA-NeXT (any-resolution tiles) when ``next_``; CLIP vision tower."""
    tokenizer = _tiny_tokenizer(
        LLAVA_SPECIALS, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    size, patch = 16, 8
    vision = dict(
        model_type="clip_vision_model",
        initializer_range=INIT,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=size,
        patch_size=patch,
        projection_dim=16,
    )
    common = dict(
        text_config=dict(
            TEXT, model_type="llama", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id
        ),
        vision_config=vision,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=(size // patch) ** 2,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    image_kwargs = dict(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    if next_:
        pinpoints = [[size, 2 * size], [2 * size, size], [2 * size, 2 * size]]
        config = LlavaNextConfig(**common, image_grid_pinpoints=pinpoints)
        model, processor_cls = LlavaNextForConditionalGeneration(config), LlavaNextProcessor
        image_processor = LlavaNextImageProcessorPil(**image_kwargs, image_grid_pinpoints=pinpoints)
    else:
        model, processor_cls = LlavaForConditionalGeneration(LlavaConfig(**common)), LlavaProcessor
        image_processor = CLIPImageProcessorPil(**image_kwargs)
    model.save_pretrained(folder)
    # "default" drops the CLS feature: one token fewer than patches + CLS, hence
    # num_additional_image_tokens=1.
    processor_cls(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=LLAVA_CHAT_TEMPLATE,
        patch_size=patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    ).save_pretrained(folder)


BUILDERS: dict[str, Callable[[Path], None]] = {
    "llava": lambda folder: _save_llava(folder, next_=False),
    "llava_next": lambda folder: _save_llava(folder, next_=True),
    "qwen2_vl": _qwen2_vl,
    "qwen2_5_vl": _qwen2_5_vl,
}


def build_tiny_vlm(arch: str, folder: str | Path, seed: int = 0) -> Path:
    """Save a tiny (about 40 k parameters) random VLM of ``arch`` to ``folder``.

    ``arch`` is one of :data:`BUILDERS`: ``llava``, ``llava_next``, ``qwen2_vl``, ``qwen2_5_vl``.
    """
    if arch not in BUILDERS:
        raise ValueError(f"unknown tiny VLM arch '{arch}'; known: {', '.join(BUILDERS)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    BUILDERS[arch](folder)
    return folder


def build_tiny_clip(folder: str | Path, seed: int = 0) -> Path:
    """Save a tiny random ``CLIPModel`` with an offline tokenizer and a 32-pixel image processor."""
    folder = Path(folder)
    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer(WORDS, folder)
    special = tokenizer.convert_tokens_to_ids(["<|startoftext|>", "<|endoftext|>"])
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            bos_token_id=special[0],
            eos_token_id=special[1],
            pad_token_id=special[1],
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
        ),
        vision_config=dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )
    model = CLIPModel(config)
    # CLIP's own init maps every image and text to nearly the same direction, with negative
    # cosines, so every clamped score would be 0. Unit-gain Gaussian weights spread the
    # cosines around 0 (about 0.02 ± 0.1), giving scores inside (0, 1) and gradients.
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, param[0].numel() ** -0.5)
    model.save_pretrained(folder)
    CLIPImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    ).save_pretrained(folder)
    return folder
