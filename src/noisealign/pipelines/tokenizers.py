"""Build CLIP BPE and T5 Unigram tokenizers offline for a small vocabulary (toy world and tests).

The CLIP files follow the format of ``openai/clip-vit-*``: ``vocab.json`` with the 256
byte-level symbols (plain and word-final ``</w>``), one merge chain per word so that every
listed word is a single token, and the two special tokens. ``CLIPTokenizer.from_pretrained(folder)``
loads it like a hub tokenizer, with character offsets. The T5 one (SD3's third tokenizer) is a
``tokenizers`` Unigram model saved as ``tokenizer.json``, no sentencepiece file needed.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from transformers import CLIPTokenizer, T5Tokenizer


def _byte_symbols() -> list[str]:
    # GPT-2 / CLIP byte-to-unicode table: printable bytes map to themselves, the rest
    # to code points from 256 up, so every byte has a visible symbol.
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    symbols, extra = [], 0
    for b in range(256):
        if b in printable:
            symbols.append(chr(b))
        else:
            symbols.append(chr(256 + extra))
            extra += 1
    return symbols


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE on one word: repeatedly merge every occurrence of the lowest-ranked pair."""
    while len(symbols) > 1:
        pairs = [p for p in zip(symbols, symbols[1:]) if p in ranks]
        if not pairs:
            break
        first, second = min(pairs, key=ranks.__getitem__)
        merged, i = [], 0
        while i < len(symbols):
            if i + 1 < len(symbols) and symbols[i] == first and symbols[i + 1] == second:
                merged.append(first + second)
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


def build_clip_tokenizer(
    words: Iterable[str], folder: str | Path, model_max_length: int = 77
) -> CLIPTokenizer:
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
        # BPE applies earlier merges first, so another word's merges (("h", "o") from "horse")
        # can split this word's chain ("photo" -> "p", "ho", "to</w>"); join whatever pieces
        # are left with merges appended after all earlier ones, until the word is one token.
        pieces = _bpe(list(word[:-1]) + [word[-1] + "</w>"], {m: i for i, m in enumerate(merges)})
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            if pair not in seen_merges:
                seen_merges.add(pair)
                merges.append(pair)
                vocab_list.append(pair[0] + pair[1])
            pieces = [pair[0] + pair[1]] + pieces[2:]
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
        raise RuntimeError(
            f"tokenizer in {folder} loaded {len(tokenizer)} tokens, expected {len(vocab)}"
        )
    split = [w for w in dict.fromkeys(w.lower() for w in words) if len(tokenizer.tokenize(w)) != 1]
    if split:
        raise RuntimeError(
            f"tokenizer in {folder} splits words that should be single tokens: {split[:5]}"
        )
    return tokenizer


def build_t5_tokenizer(
    words: Iterable[str], folder: str | Path, model_max_length: int = 256
) -> T5Tokenizer:
    """Write a T5 tokenizer whose vocabulary holds ``words`` as whole ``▁word`` pieces; load it
    back.

    Ids follow T5's layout (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2); single letters, scored below
    every word, spell out any other lower-case word instead of mapping it to ``<unk>``. No
    sentinel (``<extra_id_*>``) tokens: a text encoder never sees them.
    """
    folder = Path(folder)
    letters = [(chr(c), -10.0) for c in range(ord("a"), ord("z") + 1)]
    pieces = [("▁" + w, -1.0) for w in dict.fromkeys(w.lower() for w in words)]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0), *letters, *pieces]
    T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=model_max_length).save_pretrained(folder)
    tokenizer = T5Tokenizer.from_pretrained(folder)
    if len(tokenizer) != len(vocab):
        raise RuntimeError(
            f"tokenizer in {folder} loaded {len(tokenizer)} tokens, expected {len(vocab)}"
        )
    return tokenizer
