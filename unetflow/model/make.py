"""Fresh, untrained checkpoints (``unetflow model init``)."""

from __future__ import annotations

import torch

from unetflow.config import ModelSpec
from unetflow.model.checkpoint import check_replaceable, save_checkpoint
from unetflow.model.unet import UNet


def init_checkpoint(path: str, spec: ModelSpec, *, seed: int = 0, overwrite: bool = False) -> UNet:
    """Write a freshly initialised U-Net for *spec* to *path* (deterministic for *seed*)."""
    check_replaceable(path, overwrite=overwrite)  # --overwrite replaces only a unetflow checkpoint
    torch.manual_seed(seed)
    net = UNet(spec)
    save_checkpoint(path, net, extra={"made_by": f"unetflow model init (seed {seed})"})
    return net
