"""A network resident on one device: what a worker keeps between blocks.

:class:`Predictor` runs batches of patches through the net on its device (CPU lanes
side by side, or one GPU, channels-last, with guarded mixed precision); :func:`get_predictor` loads it once
per process and then reuses it. A :class:`NetSource` is the small picklable recipe that
travels to the workers instead of the weights.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterator, Protocol

import numpy as np
import torch

from unetflow.errors import ConfigError
from unetflow.geometry import NetGeometry
from unetflow.model.geometry import activation_bytes

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


def model_source(path: str, *, trust_code: bool = False) -> NetSource:
    """The source for ``--model PATH``: a bioimage.io package (a .zip holding an
    rdf.yaml, the yaml, or a folder; :mod:`unetflow.model.zoo`) or a unetflow checkpoint."""
    from unetflow.model import zoo

    if zoo.is_package(path):
        return zoo.PackageSource(path, trust_code=trust_code)
    from unetflow.errors import InputNotFoundError

    if os.path.isdir(path):
        raise InputNotFoundError(f"model folder {path} holds no rdf.yaml or bioimageio.yaml; pass a unetflow checkpoint (.pt) "
                                 "or a bioimage.io package (.zip, rdf.yaml or its unpacked folder)")
    if not os.path.exists(path) and path.endswith((".zip", ".yaml")):
        raise InputNotFoundError(f"model package {path} does not exist; check the path")
    return CheckpointSource(path)


@dataclass(frozen=True)
class NetInfo:
    """What the driver and the block code need to know about a loaded network."""

    dims: int
    in_channels: int
    classes: int
    activation: str  # softmax, sigmoid or none
    geometry: NetGeometry


def net_info(net: torch.nn.Module) -> NetInfo:
    """Describe a UNet (it has ``.spec``) or an oracle net (it has plain attributes)."""
    described: Any = net  # the attributes below are the nets' own, not torch.nn.Module's
    spec = getattr(net, "spec", None)
    if spec is not None:
        activation = "softmax" if spec.classes > 1 else "sigmoid"
        return NetInfo(spec.dims, spec.in_channels, spec.classes, activation, described.geometry)
    return NetInfo(described.dims, described.in_channels, described.classes, described.activation, described.geometry)


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def torch_huge_pages() -> bool:
    """Whether torch's large CPU buffers (activations) lie in mappings eligible for
    transparent huge pages (``THPeligible: 1`` in ``/proc/self/smaps``, checked on a
    probe buffer): see :func:`unetflow.tuning.tune_allocator`."""
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


AMP_MEAN_TOLERANCE = 0.02  # mean |probability difference| bf16 vs float32 on the probe batch
AMP_FLIP_TOLERANCE = 0.02  # fraction of probe voxels whose argmax may differ


class Predictor:
    """A resident network on one device: device tensors in, activated float32 outputs out.

    Batches stay on the device (:meth:`run`): the block engine cuts them from rows it
    uploaded and blends the outputs there (:mod:`unetflow.infer`). On a GPU the net runs
    channels-last and ``amp`` runs it in bf16 (fp16 where bf16 is missing), guarded by
    :meth:`check_amp`; on a CPU *lanes* forward passes run side by side, one torch thread each.
    """

    def __init__(self, net: torch.nn.Module, *, device: torch.device, amp: bool, compile: bool = False, lanes: int = 1,
                 tta: bool = False) -> None:
        self.info = net_info(net)
        self.tta = tta  # average the outputs over every flip of the spatial axes (see forward_tta)
        self.device = device
        self.amp = amp
        self.amp_check: dict[str, Any] | None = None  # what check_amp measured
        # CPU: *lanes* patches run side by side, one torch thread each (see get_predictor)
        self.lanes = max(1, lanes) if device.type == "cpu" else 1
        self._lane_pool = ThreadPoolExecutor(self.lanes, thread_name_prefix="unetflow-lane")
        self.net = net.to(device).eval()
        self.memory_format = torch.preserve_format
        if device.type == "cuda":
            self.memory_format = torch.channels_last_3d if self.info.dims == 3 else torch.channels_last
            self.net = self.net.to(memory_format=self.memory_format)  # type: ignore[call-overload]  # torch's stubs omit it
        self.amp_dtype = torch.bfloat16 if device.type != "cuda" or torch.cuda.is_bf16_supported() else torch.float16
        self.forward = torch.compile(self.net, dynamic=False) if compile else self.net

    def submit(self, batch: torch.Tensor, clock: Any = None) -> Future[torch.Tensor]:
        """Start one forward pass of *batch* (on the device): on a free CPU lane, or (GPU,
        one lane) queued on the device's stream right away, without waiting for it. The
        caller keeps ``2 * lanes`` in flight so that no lane waits for it."""
        if self.lanes > 1:
            return self._lane_pool.submit(self.run, batch, clock)
        done: Future[torch.Tensor] = Future()
        try:
            done.set_result(self.run(batch, clock))
        except BaseException as e:  # noqa: BLE001 - handed to the caller through the future
            done.set_exception(e)
        return done

    @torch.inference_mode()
    def run(self, batch: torch.Tensor, clock: Any = None, *, amp: bool | None = None) -> torch.Tensor:
        """One forward pass: (B, C, *patch) on the device -> (B, K, *out) float32 on the device,
        activated. *clock* (a :class:`unetflow.telemetry.Clock`) times it as ``forward``.

        Raises
        ------
        ConfigError
            The GPU ran out of memory: the message names ``--batch-size`` and ``--patch-shape``.
        """
        use_amp = self.amp if amp is None else amp
        try:
            x = batch.to(self.device, non_blocking=True)
            if self.device.type == "cuda":
                x = x.contiguous(memory_format=self.memory_format)
            with clock.device("forward") if clock is not None else contextlib.nullcontext():
                if not self.tta:
                    return self._activated(x, use_amp)
                return forward_tta(lambda v: self._activated(v, use_amp), x)
        except torch.cuda.OutOfMemoryError:
            raise out_of_memory(self.device, batch.shape[0], tuple(batch.shape[2:])) from None

    def _activated(self, x: torch.Tensor, use_amp: bool) -> torch.Tensor:
        """The net's float32 output of *x*, through its activation."""
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=use_amp):
            y = self.forward(x)
        y = y.float()
        if self.info.activation == "softmax":
            return torch.softmax(y, dim=1)
        if self.info.activation == "sigmoid":
            return torch.sigmoid(y)
        return y

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """*batch*: ndarray float32 of shape (B, C, *patch) -> (B, K, *out) float32 ndarray.

        A host-side convenience (tests, benchmarks); on CPU with several lanes the batch
        is split across them (torch releases the GIL).
        """
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
        if self.lanes < 2 or len(batch) < 2:
            return self.run(x).cpu().numpy()
        parts = torch.tensor_split(x, min(self.lanes, len(batch)))
        return torch.cat(list(self._lane_pool.map(self.run, parts))).cpu().numpy()

    def check_amp(self, patch: tuple[int, ...], *, mean_tolerance: float = AMP_MEAN_TOLERANCE,
                  flip_tolerance: float = AMP_FLIP_TOLERANCE) -> dict[str, Any] | None:
        """The bf16 guard: one probe batch in float32 and in the amp dtype; if the outputs
        differ by more than *mean_tolerance* on average (probabilities) or the argmax on
        more than a *flip_tolerance* fraction of voxels, warn once and run this model in
        float32 from now on. bf16 3-D convolutions have been silently wrong on some
        PyTorch/cuDNN versions (pytorch issue 163539). Once per predictor; None without amp."""
        if not self.amp or self.amp_check is not None:
            return self.amp_check
        g = torch.Generator().manual_seed(0)
        x = torch.randn((1, self.info.in_channels, *patch), generator=g).to(self.device)
        full = self.run(x, amp=False)
        half = self.run(x, amp=True)
        mean = float((full - half).abs().mean())
        flips = float((full.argmax(1) != half.argmax(1)).float().mean()) if full.shape[1] > 1 else float(((full > 0.5) != (half > 0.5)).float().mean())
        ok = math.isfinite(mean) and mean <= mean_tolerance and flips <= flip_tolerance
        self.amp_check = {"dtype": str(self.amp_dtype).replace("torch.", ""), "mean_abs_diff": round(mean, 6), "argmax_flips": round(flips, 6),
                          "kept": ok}
        if not ok:
            log.warning(
                "%s on %s differs from float32 on a probe batch (mean |difference| %.3g > %.3g or argmax flips %.2g%% > %.2g%%): "
                "running this model in float32 (slower); pass --no-amp to silence this", self.amp_check["dtype"], self.device,
                mean, mean_tolerance, 100 * flips, 100 * flip_tolerance,
            )
            self.amp = False
        return self.amp_check


def flip_sets(dims: int) -> list[tuple[int, ...]]:
    """Every subset of the *dims* spatial axes of a (B, C, *S) batch: 4 flips in 2-D, 8 in 3-D.

    >>> flip_sets(2)
    [(), (2,), (3,), (2, 3)]
    """
    axes = range(2, 2 + dims)
    return [tuple(a for a in axes if mask >> (a - 2) & 1) for mask in range(2**dims)]


def forward_tta(forward: Any, x: torch.Tensor) -> torch.Tensor:
    """Test-time augmentation: the mean of ``flip(forward(flip(x)))`` over :func:`flip_sets`.

    Per patch, summed in a fixed flip order, so a tiled run blends the same patch
    outputs in the same global order as without it: blockwise still equals whole-image.
    Costs one forward pass per flip. Each flip is its own inverse, and for a ``same``
    net or a ``valid`` net (symmetric margin) the output stays aligned with the input.
    """
    flips = flip_sets(x.ndim - 2)
    total: torch.Tensor = forward(x)  # flips[0] is no flip
    for axes in flips[1:]:
        total = total + torch.flip(forward(torch.flip(x, axes)), axes)
    return total / len(flips)


def out_of_memory(device: torch.device, batch: int, patch: tuple[int, ...]) -> ConfigError:
    return ConfigError(
        f"out of GPU memory on {device} for a batch of {batch} patches of shape {tuple(patch)}; "
        "pass a smaller --batch-size (or --batch-size 0 to size it from free memory) or a smaller --patch-shape"
    )


_PREDICTORS: dict[tuple[Any, str, bool, bool, bool], Predictor] = {}


def get_predictor(source: Any, *, device: str = "auto", amp: bool | None = None, threads: int = 0, compile: bool = False,
                  tta: bool = False) -> Predictor:
    """The worker's resident predictor for *source*: loaded on first use, then reused.

    On a CPU it runs its patches side by side, one torch thread each, which beat one
    patch on all threads (conv3d scales poorly across threads: BENCHMARKS.md): this sets
    torch's intra-op threads to 1 in the worker's process. A run whose blocks compute in
    the caller's process gives the caller its threads back (:func:`torch_threads_kept`).
    """
    dev = pick_device(device)
    use_amp = (dev.type == "cuda") if amp is None else bool(amp)
    key = (source, str(dev), use_amp, compile, tta)
    if dev.type == "cpu":
        torch.set_num_threads(1)
    if key not in _PREDICTORS:
        lanes = 1 if dev.type != "cpu" else threads if threads > 0 else (os.cpu_count() or 1)
        log.debug("loading model %s on %s (pid %d)", source, dev, os.getpid())
        _PREDICTORS[key] = Predictor(source.load(), device=dev, amp=use_amp, compile=compile, lanes=lanes, tta=tta)
    return _PREDICTORS[key]


@contextlib.contextmanager
def torch_threads_kept() -> Iterator[None]:
    """Restore torch's intra-op thread count on exit: blocks that run in this process set it
    to 1 (:func:`get_predictor`), and the process is the caller's, not the run's."""
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


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
    per_patch = activation_bytes(width, depth, patch, itemsize=2 if predictor.amp else 4)
    return int(max(1, min(64, free // 2 // max(per_patch, 1))))
