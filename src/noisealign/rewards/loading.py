"""Loading reward model folders (local or hub) with strict weights and one-line errors.

``PyTorchModelHubMixin`` loads weights non-strictly by default, so a folder from another
architecture would load "successfully" with random weights; here every key must match.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import constants, hf_hub_download

from .. import dry_run
from ..errors import ConfigError, DataError, NoiseAlignError

CONFIG_NAME = constants.CONFIG_NAME  # "config.json"
WEIGHTS_NAME = constants.SAFETENSORS_SINGLE_FILE  # "model.safetensors"


def _resolve(model_id: str, filename: str, **hub_kwargs: Any) -> str:
    if os.path.isdir(model_id):
        path = os.path.join(model_id, filename)
        if not os.path.isfile(path):
            raise DataError(
                f"reward model folder '{model_id}' has no {filename}; save it with save_pretrained"
            )
        return path
    try:
        return hf_hub_download(repo_id=model_id, filename=filename, **hub_kwargs)
    except Exception as exc:  # hub errors come in many types; the first line says which
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(
            f"cannot find reward model '{model_id}': not a local folder and the hub lookup failed "
            f"({first}); pass a folder written by save_pretrained or a reachable hub id"
        ) from exc


def load_weights_strict(
    cls: type[torch.nn.Module],
    *,
    model_id: str,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    force_download: bool = False,
    local_files_only: bool = False,
    token: str | bool | None = None,
    map_location: str = "cpu",
    strict: bool = True,
    **model_kwargs: Any,
) -> torch.nn.Module:
    """Build ``cls(**model_kwargs)`` and load ``model.safetensors`` with every key required."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    hub = {
        "revision": revision,
        "cache_dir": cache_dir,
        "force_download": force_download,
        "local_files_only": local_files_only,
        "token": token,
    }
    if "config" not in model_kwargs:
        raise DataError(
            f"reward model '{model_id}' has no {CONFIG_NAME}; save it with save_pretrained"
        )
    model = cls(**model_kwargs)
    path = _resolve(model_id, WEIGHTS_NAME, **hub)
    try:
        state = load_file(path, device=map_location)
    except (SafetensorError, OSError) as exc:
        raise DataError(
            f"reward model weights '{path}' are corrupt ({exc}); save the model again or download it again"
        ) from exc
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [k for k in state if k in expected and expected[k].shape != state[k].shape]
    if strict and (missing or unexpected or mismatched):
        raise DataError(
            f"reward model weights in '{model_id}' do not fit its {CONFIG_NAME} (missing "
            f"{len(missing)}, unexpected {len(unexpected)}, mis-shaped {len(mismatched)} tensors, e.g. "
            f"{(missing + unexpected + mismatched)[:2]}); it was saved by another architecture or "
            "size: save the model again"
        )
    model.load_state_dict(state, strict=strict)
    return model.eval()


def read_config(path_or_id: str, **hub_kwargs: Any) -> dict[str, Any]:
    """The folder's ``config.json`` as a dict; :class:`DataError` if missing or not JSON."""
    path = _resolve(path_or_id, CONFIG_NAME, **hub_kwargs)
    try:
        config = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(
            f"reward model config '{path}' is not valid JSON; save the model again"
        ) from exc
    if not isinstance(config, dict):
        raise DataError(f"reward model config '{path}' is not a JSON object; save the model again")
    return config


def load_reward_model(
    path_or_id: str, expected_signature: dict[str, Any] | None = None, **hub_kwargs: Any
) -> torch.nn.Module:
    """Load any reward model folder by its ``architecture``; check it against a pipeline's signature.

    Example:
        >>> model = load_reward_model("reward_models/toy")  # doctest: +SKIP
    """
    from ..pipelines import check_compatible
    from . import ARCHITECTURES

    if isinstance(path_or_id, os.PathLike):
        path_or_id = os.fspath(path_or_id)
    if not isinstance(path_or_id, str) or not path_or_id:
        raise ConfigError(
            f"'path_or_id' is {path_or_id!r}; pass the reward model folder or hub id as a string"
        )
    if expected_signature is not None and not isinstance(expected_signature, dict):
        raise ConfigError(
            f"'expected_signature' is a {type(expected_signature).__name__}; pass pipeline_signature(pipe) or None"
        )

    config = read_config(path_or_id, **hub_kwargs)
    name = config.get("architecture")
    if name not in ARCHITECTURES:
        raise DataError(
            f"reward model '{path_or_id}' has architecture {name!r}; known: {', '.join(ARCHITECTURES)}"
        )
    try:
        model = ARCHITECTURES[name]().from_pretrained(path_or_id, **hub_kwargs)
    except NoiseAlignError:
        raise
    except (TypeError, ValueError, RuntimeError) as exc:
        raise DataError(
            f"reward model '{path_or_id}' cannot be built from its config ({exc}); save the model again"
        ) from exc
    if expected_signature is not None and model.config.pipeline_signature is not None:
        check_compatible(
            model.config.pipeline_signature, expected_signature, f"reward model '{path_or_id}'"
        )
    return dry_run.track("reward model", model)
