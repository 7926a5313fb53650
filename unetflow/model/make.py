"""Fresh, untrained checkpoints (``unetflow model init``)."""

from __future__ import annotations

import os

import torch

from unetflow.config import ModelSpec
from unetflow.errors import OutputExistsError
from unetflow.model.checkpoint import save_checkpoint
from unetflow.model.unet import UNet


def init_checkpoint(path: str, spec: ModelSpec, *, seed: int = 0, overwrite: bool = False) -> UNet:
    """Write a freshly initialised U-Net for *spec* to *path* (deterministic for *seed*)."""
    if os.path.exists(path) and not overwrite:
        raise OutputExistsError(f"model file {path} already exists; pass --overwrite to replace it or choose another path")
    torch.manual_seed(seed)
    net = UNet(spec)
    save_checkpoint(path, net, extra={"made_by": f"unetflow model init (seed {seed})"})
    return net
