"""Values in and out of the model, on any device: normalising raw rows, converting
finished planes to the written dtype (probabilities, labels, instance classes)."""

from __future__ import annotations

import numpy as np
import torch

from unetflow.config import NormSpec
from unetflow.job import OutputSpec
from unetflow.label import instance_classes, local_components

# dtypes a raw row crosses to the device in (others are made float32 on the host first)
_UPLOAD_DTYPES = {np.dtype(t) for t in ("bool", "uint8", "int8", "int16", "uint16", "int32", "float16", "float32")}


def normalise_tensor(raw: torch.Tensor, norm: NormSpec, stats: tuple[tuple[float, float], ...], *, slab: int = 0,
                     uint16_bits: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
    """A raw row (C, Z, ...) on its device, in its own dtype -> float32 as the model was trained to see it.

    ``stats`` holds per channel (low, high) percentiles or (mean, std). *slab*: planes
    per step along axis 1 (0: all at once; a few keep a CPU's work in its cache).
    *uint16_bits*: *raw* is int16 holding uint16 bits (how uint16 crosses to a GPU:
    torch's CUDA kernels do not convert uint16). *out*: a float32 tensor to write into.
    """
    if uint16_bits:
        raw = raw.to(torch.int32).bitwise_and_(0xFFFF)
    if out is None:
        out = torch.empty(raw.shape, dtype=torch.float32, device=raw.device)
    step = slab if slab > 0 else raw.shape[1]
    for c in range(raw.shape[0]):
        for z in range(0, raw.shape[1], step):
            part = out[c, z : z + step]
            part.copy_(raw[c, z : z + step])
            if norm.kind != "none":
                a, b = stats[c]
                part.sub_(a).div_(max(b - a, 1e-6) if norm.kind == "percentile" else max(b, 1e-6))
    return out


def normalise(data: np.ndarray, norm: NormSpec, stats: tuple[tuple[float, float], ...]) -> np.ndarray:
    """Raw input (C, ...) ndarray -> float32 ndarray: :func:`normalise_tensor` on the host."""
    return normalise_tensor(torch.from_numpy(uploadable(data)), norm, stats).numpy()


def uploadable(data: np.ndarray) -> np.ndarray:
    data = np.ascontiguousarray(data)
    return data if data.dtype in _UPLOAD_DTYPES else data.astype(np.float32)


def norm_stats(samples: np.ndarray, norm: NormSpec) -> tuple[tuple[float, float], ...]:
    """Per-channel statistics from *samples* (ndarray of shape (C, N))."""
    if norm.kind == "none":
        return tuple((0.0, 1.0) for _ in samples)
    if norm.kind == "percentile":
        lo, hi = np.percentile(samples.astype(np.float64), [norm.low, norm.high], axis=1)
        return tuple((float(a), float(b)) for a, b in zip(lo, hi))
    s = samples.astype(np.float64)
    return tuple((float(m), float(d)) for m, d in zip(s.mean(axis=1), s.std(axis=1)))


_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "uint8": torch.uint8}


def written_dtype(output: OutputSpec) -> torch.dtype:
    """The torch dtype converted values have on the device (instances: the uint8 class map)."""
    if output.kind == "instances":
        return torch.uint8
    if output.kind == "labels" and output.dtype != "uint8":
        return torch.int32  # argmax ids; widened to the written unsigned type on the host
    return _TORCH_DTYPES[output.dtype]


def convert_values(values: torch.Tensor, output: OutputSpec, out: torch.Tensor | None = None) -> torch.Tensor:
    """Blended values (K, ...) float32 -> what is written, on their device (into *out* if given).

    ``probabilities`` in a dtype (uint8: x255, rounded half to even, clipped); ``labels``:
    the argmax; ``instances``: the class map of :func:`unetflow.label.instance_classes`.
    """
    result: torch.Tensor
    if output.kind == "instances":
        result = instance_classes(values, output.interior_threshold)
    elif output.kind == "labels":
        result = values.argmax(dim=0)
    elif output.dtype == "uint8":
        result = values.mul(255.0).round_().clamp_(0, 255)
    else:
        result = values
    if out is None:
        return result.to(written_dtype(output))
    return out.copy_(result)


def convert_output(values: np.ndarray, output: OutputSpec) -> tuple[np.ndarray, int]:
    """Blended values (K, ...) ndarray -> what is written, and the block's object count (instances).

    ``instances``: the block's confident-interior components numbered locally (steps 0
    and 1 of :mod:`unetflow.label`).
    """
    data = _host_values(convert_values(torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)), output), output)
    if output.kind == "instances":
        return local_components(data)
    return data, 0


def _host_values(t: torch.Tensor, output: OutputSpec) -> np.ndarray:
    data = t.numpy()
    if output.kind == "labels" and data.dtype != np.dtype(output.dtype):
        data = data.astype(output.dtype)
    return data
