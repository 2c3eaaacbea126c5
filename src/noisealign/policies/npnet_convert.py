"""Official NPNet checkpoints ↔ :class:`~noisealign.policies.npnet_compat.NPNetCompat`, converter.

    python -m noisealign.policies.npnet_convert IN.pth OUT_FOLDER [--overwrite]
    noisealign convert_npnet IN.pth OUT_FOLDER                      # the same

The official checkpoint (``torch.save`` in the authors' training code) is a dict::

    unet_embedding: NoiseTransformer state dict (swin.* in timm's layout, downconv.*, upconv.*)
    unet_svd:       SVDNoiseUnet state dict (mlp1..4, attention.qkv/proj, bn.*)
    embeeding:      AdaGroupNorm state dict (linear.*); sic — their inference script reads
                    "embedding", so both spellings are accepted
    alpha, beta:    tensors of shape (1,)

Its safetensors mirror holds the same tensors under flat keys (``unet_svd.mlp1.0.weight``,
``alpha``...). ``.pth`` files are read with ``torch.load(weights_only=True)``: tensors and
dicts only, never arbitrary pickled objects. The output folder is ``save_pretrained``'s
(config.json + model.safetensors), loadable with ``noisealign.policies.load_policy``.

Example:
    >>> model = load_official_npnet("sdxl.pth")  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import pickle
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..errors import DataError
from ..nn import read_safetensors, state_mismatch
from .npnet_compat import NPNetCompat, NPNetCompatConfig
from .swin import timm_to_transformers, transformers_to_timm

logger = logging.getLogger("noisealign.npnet_convert")

GROUPS = ("unet_embedding", "unet_svd", "embeeding")
TEXT_ALIASES = ("embeeding", "embedding")
TEXT_LENGTH = 77  # the flattened token count of every released checkpoint (CLIP's 77)


def _first_line(exc: Exception) -> str:
    """torch's weights-only errors run to a dozen lines; the first says what went wrong."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0][:200] if lines else type(exc).__name__


def read_official(path: str | Path) -> dict[str, Any]:
    """The official dict from ``.pth`` (weights only) or its ``.safetensors`` mirror, on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"official NPNet checkpoint '{path}' does not exist")
    if path.suffix == ".safetensors":
        flat = read_safetensors(path, "official NPNet checkpoint")
        nested: dict[str, Any] = {}
        for key, value in flat.items():
            group, _, rest = key.partition(".")
            if rest:
                nested.setdefault(group, {})[rest] = value
            else:
                nested[key] = value
        return nested
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch words it "Unsupported global" or "unsupported GLOBAL" depending on the version
        if "unsupported global" not in str(exc).lower():  # no object refused: a damaged file
            raise DataError(
                f"official NPNet checkpoint '{path}' is corrupt or not a torch file "
                f"({_first_line(exc)})"
            ) from exc
        raise DataError(
            f"'{path}' holds pickled Python objects, not just tensors, and is not unpickled here "
            "(it could run code); on a machine where you trust the file, re-save it as a dict of "
            "state dicts of tensors (torch.save) or as safetensors, then convert that"
        ) from exc
    except (RuntimeError, EOFError, OSError) as exc:
        raise DataError(
            f"official NPNet checkpoint '{path}' is corrupt or not a torch file "
            f"({_first_line(exc)})"
        ) from exc


def _text_group(official: Mapping[str, Any], path: object) -> Mapping[str, torch.Tensor]:
    for name in TEXT_ALIASES:
        if name in official:
            return official[name]
    missing = [
        k for k in ("unet_embedding", "unet_svd", "embeeding", "alpha", "beta") if k not in official
    ]
    raise DataError(
        f"'{path}' is not an official NPNet checkpoint: missing {missing}; it must hold "
        "unet_embedding, unet_svd, embeeding (or embedding), alpha and beta"
    )


def official_to_state_dict(
    official: Mapping[str, Any], path: object = "checkpoint", text_length: int = TEXT_LENGTH
) -> tuple[dict[str, torch.Tensor], NPNetCompatConfig]:
    """:class:`NPNetCompat` state dict and config (read off the tensor shapes) of official ones."""
    text = _text_group(official, path)
    for key in ("unet_embedding", "unet_svd", "alpha", "beta"):
        if key not in official:
            raise DataError(f"'{path}' is not an official NPNet checkpoint: it has no '{key}'")
    embedding = official["unet_embedding"]
    swin = {k.removeprefix("swin."): v for k, v in embedding.items() if k.startswith("swin.")}
    state = {f"unet_embedding.features.{k}": v for k, v in timm_to_transformers(swin).items()}
    state |= {f"unet_embedding.{k}": v for k, v in embedding.items() if not k.startswith("swin.")}
    state |= {f"unet_svd.{k}": v for k, v in official["unet_svd"].items()}
    state |= {f"text_embedding.{k}": v for k, v in text.items()}
    state |= {k: torch.as_tensor(official[k]).detach().reshape(1) for k in ("alpha", "beta")}
    return state, _config_from(swin, official["unet_svd"], text, path, text_length)


def _config_from(swin, svd, text, path, text_length: int) -> NPNetCompatConfig:
    try:
        flat_text = text["linear.weight"].shape[1]
        if flat_text % text_length:
            raise DataError(
                f"'{path}': the text embedding takes {flat_text} numbers, not a multiple of "
                f"{text_length} tokens; pass text_length (the pipeline's token count)"
            )
        stages = sorted(
            {int(m.group(1)) for k in swin if (m := re.match(r"layers\.(\d+)\.blocks\.", k))}
        )
        depths = [
            len({k.split(".")[3] for k in swin if k.startswith(f"layers.{i}.blocks.")})
            for i in stages
        ]
        heads = [
            swin[f"layers.{i}.blocks.0.attn.relative_position_bias_table"].shape[1] for i in stages
        ]
        return NPNetCompatConfig(
            resolution=svd["mlp1.0.weight"].shape[1] // 2,
            text_dim=flat_text // text_length,
            text_length=text_length,
            swin_embed_dim=swin["patch_embed.proj.weight"].shape[0],
            swin_depths=depths,
            swin_heads=heads,
        )
    except (KeyError, IndexError) as exc:
        raise DataError(f"'{path}' is not an official NPNet checkpoint (no tensor {exc})") from exc


def load_official_npnet(
    path: str | Path, text_length: int = TEXT_LENGTH, **config_fields: Any
) -> NPNetCompat:
    """:class:`NPNetCompat` in eval mode with the weights of an official ``.pth``/``.safetensors``.

    ``config_fields`` (e.g. ``pipeline="stabilityai/stable-diffusion-xl-base-1.0"``) are
    recorded in its config; the sizes come from the tensor shapes and ``text_length`` (77 for
    every released checkpoint), which the flattened text input cannot tell apart from D.
    """
    state, config = official_to_state_dict(read_official(path), path, text_length)
    model = NPNetCompat(dataclasses.replace(config, **config_fields))
    problem = state_mismatch(model, state)
    if problem is not None:
        raise DataError(
            f"'{path}' does not fit the official NPNet architecture ({problem}); is it a "
            "released checkpoint?"
        )
    model.load_state_dict(state)
    return model.eval()


def official_state(model: NPNetCompat) -> dict[str, Any]:
    """The official dict of ``model`` (timm >= 0.9 Swin layout, key ``embeeding``), tensors only."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    features = {
        k.removeprefix("unet_embedding.features."): v
        for k, v in state.items()
        if k.startswith("unet_embedding.features.")
    }
    embedding = {f"swin.{k}": v for k, v in transformers_to_timm(features).items()}
    embedding |= {
        k.removeprefix("unet_embedding."): v
        for k, v in state.items()
        if k.startswith(("unet_embedding.downconv", "unet_embedding.upconv"))
    }

    def group(prefix: str) -> dict[str, torch.Tensor]:
        return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}

    return {
        "unet_embedding": embedding,
        "unet_svd": group("unet_svd."),
        "embeeding": group("text_embedding."),
        "alpha": state["alpha"],
        "beta": state["beta"],
    }


def save_official(model: NPNetCompat, path: str | Path) -> None:
    """Write ``model`` as an official ``.pth`` (plain tensors) or its flat safetensors mirror."""
    official = official_state(model)
    if str(path).endswith(".safetensors"):
        flat = {f"{g}.{k}": v.contiguous() for g in GROUPS for k, v in official[g].items()}
        save_file(flat | {"alpha": official["alpha"], "beta": official["beta"]}, str(path))
    else:
        torch.save(official, path)


def main(args: Sequence[str] | None = None) -> Path:
    """Convert an official checkpoint to a ``save_pretrained`` folder; returns the folder."""
    parser = argparse.ArgumentParser(
        prog="noisealign convert_npnet", description=__doc__.splitlines()[0]
    )
    parser.add_argument("checkpoint", help="Official NPNet .pth or its .safetensors mirror.")
    parser.add_argument("output", help="Folder to write (config.json + model.safetensors).")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing folder.")
    parser.add_argument(
        "--text_length",
        type=int,
        default=TEXT_LENGTH,
        help="Tokens per prompt (77 for every released checkpoint).",
    )
    parser.add_argument(
        "--pipeline", default=None, help="Recorded in config.json as the pipeline it belongs to."
    )
    ns = parser.parse_args(args)
    out = Path(ns.output)
    if out.exists() and not ns.overwrite:
        raise DataError(f"output folder '{out}' exists; choose another or pass --overwrite")
    model = load_official_npnet(ns.checkpoint, ns.text_length, pipeline=ns.pipeline)
    model.save_pretrained(out)
    logger.info(
        "converted %s → %s (%d parameters, resolution %d, text %dx%d)",
        ns.checkpoint,
        out,
        sum(p.numel() for p in model.parameters()),
        model.config.resolution,
        model.config.text_length,
        model.config.text_dim,
    )
    return out


if __name__ == "__main__":
    from noisealign.cli import run_stage

    run_stage(main)
