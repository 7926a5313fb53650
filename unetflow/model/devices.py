"""Whether the device a run asks for exists here: checked on the driver before any work.

A ``--device cuda`` on a machine without CUDA, or ``--gpus 4`` where fewer GPUs are
visible, is refused in one line before a cluster starts (issue 15), rather than failing
every block on a worker, or running on the CPU without a word.
"""

from __future__ import annotations

import torch

from unetflow.errors import ConfigError


def visible_gpus() -> int:
    """CUDA devices this process sees (0 where torch has no CUDA support)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _why_no_cuda() -> str:
    if not torch.backends.cuda.is_built():
        return f"this torch {torch.__version__} is built without CUDA"
    return "CUDA sees 0 GPUs (check the driver and CUDA_VISIBLE_DEVICES)"


def check_device(device: str, *, gpus: int = 0, flag: str = "--device") -> None:
    """Refuse *device* (``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``) or ``--gpus``
    *gpus* when this machine does not have them. ``auto`` and ``cpu`` always exist.

    Raises
    ------
    ConfigError
        Names what was asked for, what was found, and what to pass instead.
    """
    if gpus:
        n = visible_gpus()
        if n < gpus:
            fix = f"use --gpus {n}" if n else "use --workers N on CPU"
            why = "" if n else f" ({_why_no_cuda()})"
            raise ConfigError(f"--gpus {gpus} but CUDA sees {n} GPU{'s' if n != 1 else ''}{why}; {fix}")
    if device.startswith("cuda"):
        n = visible_gpus()
        if n == 0:
            raise ConfigError(f"{flag} {device} but CUDA is not available: {_why_no_cuda()}; use {flag} cpu (or auto)")
        index = int(device.partition(":")[2] or 0)
        if index >= n:
            raise ConfigError(f"{flag} {device} but CUDA sees {n} GPU{'s' if n != 1 else ''} (cuda:0..cuda:{n - 1}); pass one of them")
    if device == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{flag} mps but this machine has no Apple MPS device; use {flag} cpu (or auto)")
