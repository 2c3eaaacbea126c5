"""Build a CLIP BPE tokenizer offline for a small vocabulary (toy world and tests).

The files follow the format of ``openai/clip-vit-*``: ``vocab.json`` with the 256 byte-level
symbols (plain and word-final ``</w>``), one merge chain per word so that every listed word
is a single token, and the two special tokens. ``CLIPTokenizer.from_pretrained(folder)``
loads it like a hub tokenizer, with character offsets.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from transformers import CLIPTokenizer


def _byte_symbols() -> list[str]:
    # GPT-2 / CLIP byte-to-unicode table: printable bytes map to themselves, the rest
    # to code points from 256 up, so every byte has a visible symbol.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    symbols, extra = [], 0
    for b in range(256):
        if b in printable:
            symbols.append(chr(b))
        else:
            symbols.append(chr(256 + extra))
            extra += 1
    return symbols


def build_clip_tokenizer(words: Iterable[str], folder: str | Path, model_max_length: int = 77) -> CLIPTokenizer:
    """Write a CLIP tokenizer whose vocabulary holds ``words`` as whole tokens; load it back.

    Args:
        words: lower-case words without spaces.
        folder: where ``vocab.json``, ``merges.txt`` and the tokenizer config go.
        model_max_length: the text encoder's context length (77 for SD, 16 for the toy world).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    symbols = _byte_symbols()
    vocab_list = symbols + [s + "</w>" for s in symbols]
    merges: list[tuple[str, str]] = []
    seen_merges: set[tuple[str, str]] = set()
    for word in dict.fromkeys(w.lower() for w in words):
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        prefix = parts[0]
        for nxt in parts[1:]:
            pair = (prefix, nxt)
            prefix = prefix + nxt
            if pair not in seen_merges:
                seen_merges.add(pair)
                merges.append(pair)
                vocab_list.append(prefix)
    vocab_list = list(dict.fromkeys(vocab_list)) + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "CLIPTokenizer",
                "model_max_length": model_max_length,
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
                "do_lower_case": True,
            }
        )
    )
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    if len(tokenizer) != len(vocab):
        raise RuntimeError(f"tokenizer in {folder} loaded {len(tokenizer)} tokens, expected {len(vocab)}")
    return tokenizer
