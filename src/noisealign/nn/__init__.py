"""Building blocks shared by the noise projector, NPNet and the reward models.

:mod:`.layers`: positions, the patch encoder, the attention block and small layers;
:mod:`.loading`: strict loading of their folders.
"""

from .layers import (
    AttentionBlock,
    NoiseInputs,
    PatchEmbed,
    check_pooled,
    check_sizes,
    encoder_layer,
    modulate,
    norm_linear,
    sincos_2d,
    zero_linear,
)
from .loading import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    load_weights_strict,
    parse_config,
    read_config,
    read_safetensors,
    resolve,
    state_mismatch,
)

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "AttentionBlock",
    "NoiseInputs",
    "PatchEmbed",
    "check_pooled",
    "check_sizes",
    "encoder_layer",
    "load_weights_strict",
    "modulate",
    "norm_linear",
    "parse_config",
    "read_config",
    "read_safetensors",
    "resolve",
    "sincos_2d",
    "state_mismatch",
    "zero_linear",
]
