"""A network resident on one device: what a worker keeps between blocks.

:class:`Predictor` runs float32 patches through the net (CPU lanes side by side, or
one GPU with pinned buffers and mixed precision); :func:`get_predictor` loads it once
per process and then reuses it. A :class:`NetSource` is the small picklable recipe that
travels to the workers instead of the weights.
"""

from __future__ import annotations

import logging
import math
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from unetflow.errors import ConfigError

log = logging.getLogger(__name__)


class NetSource(Protocol):
    """A picklable recipe that builds the network on a worker."""

    def load(self) -> torch.nn.Module: ...


@dataclass(frozen=True)
class CheckpointSource:
    """A network from a unetflow checkpoint file (loaded with ``weights_only=True``)."""

    path: str

    def load(self) -> torch.nn.Module:
        from unetflow.model.checkpoint import load_checkpoint

        return load_checkpoint(self.path).net

    def describe(self) -> dict[str, object]:
        return {"kind": "checkpoint", "path": os.path.abspath(self.path)}


@dataclass(frozen=True)
class NetInfo:
    """What the driver and the block code need to know about a loaded network."""

    dims: int
    in_channels: int
    classes: int
    activation: str  # softmax, sigmoid or none
    geometry: Any


def net_info(net: torch.nn.Module) -> NetInfo:
    """Describe a UNet (it has ``.spec``) or an oracle net (it has plain attributes)."""
    spec = getattr(net, "spec", None)
    if spec is not None:
        activation = "softmax" if spec.classes > 1 else "sigmoid"
        return NetInfo(spec.dims, spec.in_channels, spec.classes, activation, net.geometry)
    return NetInfo(net.dims, net.in_channels, net.classes, net.activation, net.geometry)


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def torch_huge_pages() -> bool:
    """Whether torch's large CPU buffers (activations) lie in mappings eligible for
    transparent huge pages (``THPeligible: 1`` in ``/proc/self/smaps``, checked on a
    probe buffer): see :func:`unetflow.worker.tune_allocator`."""
    probe = torch.empty(8 * 2**20, dtype=torch.uint8)
    address = probe.data_ptr()
    try:
        with open("/proc/self/smaps") as smaps:
            inside = False
            for line in smaps:
                head = line.split(maxsplit=1)[0]
                if "-" in head and not head.endswith(":"):
                    lo, hi = (int(x, 16) for x in head.split("-"))
                    inside = lo <= address < hi
                elif inside and head == "THPeligible:":
                    return line.split()[1] == "1"
    except OSError:
        pass
    return False


class Predictor:
    """A resident network on one device: float32 patches in, activated outputs out.

    On a GPU the net runs channels-last, batches go through a pinned host buffer with
    non-blocking copies, and ``amp`` runs it in bf16 (fp16 where bf16 is missing).
    """

    def __init__(self, net: torch.nn.Module, *, device: torch.device, amp: bool, compile: bool = False, lanes: int = 1) -> None:
        self.info = net_info(net)
        self.device = device
        self.amp = amp
        # CPU: *lanes* patches run side by side, one torch thread each (see get_predictor)
        self.lanes = max(1, lanes) if device.type == "cpu" else 1
        self._lane_pool = ThreadPoolExecutor(self.lanes, thread_name_prefix="unetflow-lane")
        self.net = net.to(device).eval()
        self._pinned: torch.Tensor | None = None
        self.memory_format = torch.preserve_format
        if device.type == "cuda":
            self.memory_format = torch.channels_last_3d if self.info.dims == 3 else torch.channels_last
            self.net = self.net.to(memory_format=self.memory_format)
        self.amp_dtype = torch.bfloat16 if device.type != "cuda" or torch.cuda.is_bf16_supported() else torch.float16
        self.forward = torch.compile(self.net, dynamic=False) if compile else self.net

    def _to_device(self, batch: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(batch)
        if self.device.type != "cuda":
            return x
        if self._pinned is None or self._pinned.numel() < x.numel():
            self._pinned = torch.empty(x.numel(), dtype=torch.float32, pin_memory=True)
        staged = self._pinned[: x.numel()].view(x.shape).copy_(x)
        return staged.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """*batch*: ndarray float32 of shape (B, C, *patch) -> (B, K, *out) float32.

        On CPU with several lanes the batch is split across them (torch releases the GIL).
        """
        if self.lanes < 2 or len(batch) < 2:
            return self._predict(batch)
        parts = np.array_split(batch, min(self.lanes, len(batch)))
        return np.concatenate(list(self._lane_pool.map(self._predict, parts)))

    def submit(self, batch: np.ndarray) -> Future[np.ndarray]:
        """Start one forward pass of *batch* on a free lane (the device's own thread on a
        GPU); the caller keeps ``2 * lanes`` in flight so that no lane waits for it."""
        return self._lane_pool.submit(self._predict, batch)

    @torch.inference_mode()
    def _predict(self, batch: np.ndarray) -> np.ndarray:
        """One forward pass: ndarray float32 of shape (B, C, *patch) -> (B, K, *out) float32.

        Raises
        ------
        ConfigError
            The GPU ran out of memory: the message names ``--batch-size`` and ``--patch-shape``.
        """
        try:
            x = self._to_device(batch)
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp):
                y = self.forward(x)
            y = y.float()
            if self.info.activation == "softmax":
                y = torch.softmax(y, dim=1)
            elif self.info.activation == "sigmoid":
                y = torch.sigmoid(y)
            return y.cpu().numpy()
        except torch.cuda.OutOfMemoryError:
            raise ConfigError(
                f"out of GPU memory on {self.device} for a batch of {batch.shape[0]} patches of shape {tuple(batch.shape[2:])}; "
                "pass a smaller --batch-size (or --batch-size 0 to size it from free memory) or a smaller --patch-shape"
            ) from None


_PREDICTORS: dict[tuple[Any, str, bool, bool], Predictor] = {}


def get_predictor(source: Any, *, device: str = "auto", amp: bool | None = None, threads: int = 0, compile: bool = False) -> Predictor:
    """The worker's resident predictor for *source*: loaded on first use, then reused."""
    dev = pick_device(device)
    use_amp = (dev.type == "cuda") if amp is None else bool(amp)
    key = (source, str(dev), use_amp, compile)
    if key not in _PREDICTORS:
        lanes = 1
        if dev.type == "cpu":
            # Patches side by side, one torch thread each, beat one patch on all threads
            # (conv3d scales poorly across threads: BENCHMARKS.md, issue 6).
            lanes = threads if threads > 0 else (os.cpu_count() or 1)
            torch.set_num_threads(1)
        log.debug("loading model %s on %s (pid %d)", source, dev, os.getpid())
        _PREDICTORS[key] = Predictor(source.load(), device=dev, amp=use_amp, compile=compile, lanes=lanes)
    return _PREDICTORS[key]


def auto_batch_size(predictor: Predictor, patch: tuple[int, ...], requested: int) -> int:
    """*requested*, or (0) one patch per CPU lane, and on GPU
    as many patches as fit in half the free memory by an activation estimate."""
    if requested > 0:
        return requested
    if predictor.device.type != "cuda":
        return predictor.lanes  # one patch per lane
    free, _ = torch.cuda.mem_get_info(predictor.device)
    spec = getattr(predictor.net, "spec", None)
    width = getattr(spec, "width", 32)
    depth = getattr(spec, "depth", 4)
    voxels = math.prod(patch)
    per_patch = sum(6 * width * 2**lvl * voxels // 2 ** (len(patch) * lvl) for lvl in range(depth + 1))
    per_patch *= 2 if predictor.amp else 4
    return int(max(1, min(64, free // 2 // max(per_patch, 1))))
