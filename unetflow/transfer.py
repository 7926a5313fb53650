"""Host <-> device copies for the block loop: CUDA streams and events, pinned memory,
and on a CPU the reused host buffers (nothing is copied)."""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import torch

from unetflow.blend import TensorPool
from unetflow.config import NormSpec
from unetflow.telemetry import Clock
from unetflow.values import uploadable, normalise_tensor

MAX_PENDING_WRITES = 2  # at least this many slabs queued for the writers (write threads + 1)
_HOST_BUFFERS = TensorPool(keep=MAX_PENDING_WRITES + 1)  # rows and converted planes (CPU)

class Transfers:
    """Host <-> device copies on their own CUDA streams, ordered by events; on a CPU,
    nothing is copied.

    ``upload`` (reader thread): raw row -> pinned memory -> device (in its own dtype;
    uint16 as int16 bits) -> normalised float32, on the upload stream. ``arrive`` (block
    loop) makes the compute stream wait for it. ``download``: converted planes -> pinned
    host memory on the download stream; ``wait`` (writer thread) until they are there.
    Pinned buffers come from torch's caching host allocator, reused once their copy is done.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.up = torch.cuda.Stream(device) if self.cuda else None  # None on a CPU
        self.down = torch.cuda.Stream(device) if self.cuda else None

    def upload(self, parts: list[np.ndarray], norm: NormSpec, stats: tuple[tuple[float, float], ...], *,
               slab: int = 0) -> tuple[torch.Tensor, Any]:
        """Raw *parts* (consecutive along axis 1 of one row) -> the normalised row on the device."""
        parts = [uploadable(p) for p in parts]
        shape = (parts[0].shape[0], sum(p.shape[1] for p in parts), *parts[0].shape[2:])
        if not self.cuda:
            row = _HOST_BUFFERS.take(shape, torch.float32)
            z = 0
            for p in parts:
                normalise_tensor(torch.from_numpy(p), norm, stats, slab=slab, out=row[:, z : z + p.shape[1]])
                z += p.shape[1]
            return row, None
        uint16, up = parts[0].dtype == np.uint16, self.up
        assert up is not None  # self.cuda
        with torch.cuda.stream(up):
            x = torch.empty(shape, dtype=torch.int16 if uint16 else torch.from_numpy(parts[0][:0]).dtype, device=self.device)
            z = 0
            for p in parts:
                x[:, z : z + p.shape[1]].copy_(torch.from_numpy(p.view(np.int16) if uint16 else p).pin_memory(), non_blocking=True)
                z += p.shape[1]
            image = normalise_tensor(x, norm, stats, uint16_bits=uint16)
            return image, up.record_event()

    def arrive(self, image: torch.Tensor, ready: Any) -> torch.Tensor:
        if ready is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(ready)
            image.record_stream(stream)
        return image

    def output_buffer(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """Where converted planes go: device memory (torch's cache), or on a CPU a host
        buffer reused across flushes and blocks (a fresh one would page-fault in again)."""
        if self.cuda:
            return torch.empty(shape, dtype=dtype, device=self.device)
        return _HOST_BUFFERS.take(shape, dtype)

    def release(self, host: torch.Tensor) -> None:
        """*host* (from :meth:`download`, or a row from :meth:`upload` whose patches all
        ran) is no longer used: on a CPU it goes back to the pool."""
        if not self.cuda:
            _HOST_BUFFERS.give(host)

    def download(self, values: torch.Tensor, clock: Clock | None = None) -> tuple[torch.Tensor, Any]:
        if not self.cuda:
            return values, None
        computed, down = torch.cuda.current_stream(self.device).record_event(), self.down
        assert down is not None  # self.cuda
        with torch.cuda.stream(down):
            down.wait_event(computed)  # timed after the wait: the copy alone
            host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            with clock.device("download", down) if clock is not None else contextlib.nullcontext():
                host.copy_(values, non_blocking=True)
            values.record_stream(down)
            return host, down.record_event()

    @staticmethod
    def wait(ready: Any) -> None:
        if ready is not None:
            ready.synchronize()
