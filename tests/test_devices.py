"""Issue 15: a device that does not exist is refused on the driver, before any work."""

from __future__ import annotations

import pytest
import torch

from unetflow.config import RunConfig, parse_device
from unetflow.errors import ConfigError
from unetflow.model.devices import check_device


@pytest.mark.parametrize("value, expected", [("auto", "auto"), ("CPU", "cpu"), ("cuda", "cuda"), ("cuda:1", "cuda:1"), ("mps", "mps")])
def test_device_names(value, expected):
    assert parse_device(value) == expected


@pytest.mark.parametrize("value", ["junk", "cuda:x", "tpu", "cpu:0", ""])
def test_unknown_device_names_are_refused(value):
    with pytest.raises(ConfigError, match="not one of auto, cpu, cuda"):
        RunConfig(input="a", output="b", model="m", device=value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_cuda_without_cuda_is_refused():
    with pytest.raises(ConfigError, match="--device cuda but CUDA is not available.*use --device cpu"):
        check_device("cuda")
    with pytest.raises(ConfigError, match=r"--gpus 4 but CUDA sees 0 GPUs.*use --workers N on CPU"):
        check_device("auto", gpus=4)
    check_device("cpu")
    check_device("auto")


def test_more_gpus_than_visible_is_refused():
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(ConfigError, match=f"--gpus {n + 1} but CUDA sees {n} GPU"):
        check_device("auto", gpus=n + 1)
