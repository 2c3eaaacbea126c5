"""Strict loading of the noise networks' folders (local or hub): config.json and safetensors.

``PyTorchModelHubMixin`` loads weights non-strictly, so a folder of another architecture would
load "successfully" with random weights; :func:`load_weights_strict` requires every key and
shape, or raises one :class:`~noisealign.errors.DataError` that names the folder. ``what`` in
every function names the model in the errors ("policy", "reward model").
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import constants, hf_hub_download
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from ..errors import DataError

CONFIG_NAME = constants.CONFIG_NAME  # "config.json"
WEIGHTS_NAME = constants.SAFETENSORS_SINGLE_FILE  # "model.safetensors"


def resolve(model_id: str, filename: str, what: str = "model", **hub_kwargs: Any) -> str:
    """Local path of ``filename`` in a folder or hub repo; :class:`DataError` if it has none."""
    if os.path.isdir(model_id):
        path = os.path.join(model_id, filename)
        if not os.path.isfile(path):
            raise DataError(
                f"{what} folder '{model_id}' has no {filename}; save it with save_pretrained"
            )
        return path
    try:
        return hf_hub_download(repo_id=model_id, filename=filename, **hub_kwargs)
    except Exception as exc:  # hub errors come in many types; the first line says which
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(
            f"cannot find {what} '{model_id}': not a local folder and the hub lookup failed "
            f"({first}); pass a folder written by save_pretrained or a reachable hub id"
        ) from exc


def parse_config(path: str | Path, what: str = "model") -> dict[str, Any]:
    """A ``config.json`` as a dict; :class:`DataError` if it is not a JSON object."""
    try:
        config = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{what} config '{path}' is not valid JSON; save the {what} again") from exc
    if not isinstance(config, dict):
        raise DataError(f"{what} config '{path}' is not a JSON object; save the {what} again")
    return config


def read_config(path_or_id: str, what: str = "model", **hub_kwargs: Any) -> dict[str, Any]:
    """The ``config.json`` of a folder or hub repo (:func:`resolve`, :func:`parse_config`)."""
    return parse_config(resolve(path_or_id, CONFIG_NAME, what, **hub_kwargs), what)


def read_safetensors(
    path: str | Path, what: str = "model", device: str = "cpu"
) -> dict[str, torch.Tensor]:
    """Every tensor of a ``.safetensors`` file; :class:`DataError` if it cannot be read."""
    try:
        return load_file(path, device=device)
    except (SafetensorError, OSError) as exc:
        raise DataError(
            f"{what} weights '{path}' are corrupt ({exc}); save the {what} again or download "
            "it again"
        ) from exc


def state_mismatch(model: nn.Module, state: dict[str, torch.Tensor]) -> str | None:
    """What keeps ``state`` from loading strictly into ``model`` (counts and two keys), or None."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [k for k in state if k in expected and expected[k].shape != state[k].shape]
    if not (missing or unexpected or mismatched):
        return None
    return (
        f"missing {len(missing)}, unexpected {len(unexpected)}, mis-shaped {len(mismatched)} "
        f"tensors, e.g. {(missing + unexpected + mismatched)[:2]}"
    )


def load_weights_strict(
    cls: type[nn.Module],
    *,
    model_id: str,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    force_download: bool = False,
    local_files_only: bool = False,
    token: str | bool | None = None,
    map_location: str = "cpu",
    strict: bool = True,
    what: str = "model",
    **model_kwargs: Any,
) -> nn.Module:
    """``PyTorchModelHubMixin._from_pretrained`` that builds ``cls(**model_kwargs)`` and loads
    ``model.safetensors`` with every key required; ``what`` names the model in errors.

    A class opts in with ``_from_pretrained = classmethod(load_weights_strict)``.
    """
    hub = {
        "revision": revision,
        "cache_dir": cache_dir,
        "force_download": force_download,
        "local_files_only": local_files_only,
        "token": token,
    }
    if "config" not in model_kwargs:
        raise DataError(f"{what} '{model_id}' has no {CONFIG_NAME}; save it with save_pretrained")
    model = cls(**model_kwargs)
    state = read_safetensors(resolve(model_id, WEIGHTS_NAME, what, **hub), what, map_location)
    problem = state_mismatch(model, state)
    if strict and problem is not None:
        raise DataError(
            f"{what} weights in '{model_id}' do not fit its {CONFIG_NAME} ({problem}); it was "
            f"saved by another architecture or size: save the {what} again"
        )
    model.load_state_dict(state, strict=strict)
    return model.eval()
