"""The U-Net: parts plus one assembly that reads like the paper's diagram.

``DoubleConv``, ``Down``, ``Up`` and ``OutConv`` work in 2-D and 3-D; the spatial
layer classes are picked from ``dims``. Tensors are ``(B, C, [Z,] Y, X)``.
Sizes are never padded to fit: :class:`UNet` refuses an input its geometry refuses.
"""

from __future__ import annotations

import copy
import logging
import math

import torch
from torch import nn

from unetflow.config import ModelSpec
from unetflow.errors import ShapeError
from unetflow.model.geometry import KERNEL, POOL, UNetGeometry

logger = logging.getLogger(__name__)

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_UPCONV = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_POOL = {2: nn.MaxPool2d, 3: nn.MaxPool3d}


class DoubleConv(nn.Module):
    """(conv3x3 => ReLU) * 2"""

    def __init__(self, dims: int, in_channels: int, out_channels: int, *, padding: str) -> None:
        super().__init__()
        pad = (KERNEL - 1) // 2 if padding == "same" else 0
        conv = _CONV[dims]
        self.block = nn.Sequential(
            conv(in_channels, out_channels, KERNEL, padding=pad),
            nn.ReLU(inplace=True),
            conv(out_channels, out_channels, KERNEL, padding=pad),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class Down(nn.Module):
    """maxpool2 => DoubleConv"""

    def __init__(self, dims: int, in_channels: int, out_channels: int, *, padding: str) -> None:
        super().__init__()
        self.pool = _POOL[dims](POOL, stride=POOL)
        self.conv = DoubleConv(dims, in_channels, out_channels, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.pool(x))


class Up(nn.Module):
    """upconv2 => crop-concat skip => DoubleConv"""

    def __init__(self, dims: int, in_channels: int, out_channels: int, *, padding: str) -> None:
        super().__init__()
        self.crop = padding == "valid"
        self.up = _UPCONV[dims](in_channels, out_channels, POOL, stride=POOL)
        self.conv = DoubleConv(dims, 2 * out_channels, out_channels, padding=padding)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)
        if self.crop:
            skip = centre_crop(skip, tuple(x.shape[2:]))
        elif skip.shape[2:] != x.shape[2:]:
            raise ShapeError(
                f"skip of shape {tuple(skip.shape[2:])} does not match the up-sampled "
                f"{tuple(x.shape[2:])} in a same-padded U-Net; the input was not a multiple "
                "of 2**depth (UNet.forward refuses such inputs; call it, not the parts)"
            )
        return self.conv(torch.cat([skip, x], dim=1))


class OutConv(nn.Module):
    """conv1x1 => class scores (logits)"""

    def __init__(self, dims: int, in_channels: int, classes: int) -> None:
        super().__init__()
        self.conv = _CONV[dims](in_channels, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def centre_crop(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The centre ``shape`` of the spatial axes of *x* ``(B, C, *spatial)``.

    Raises
    ------
    ShapeError
        If *x* is smaller than *shape*, or the difference is odd on some axis (no
        centre): both mean the geometry was not checked first.
    """
    have = tuple(x.shape[2:])
    diff = [h - s for h, s in zip(have, shape)]
    if len(have) != len(shape) or any(d < 0 or d % 2 for d in diff):
        raise ShapeError(
            f"cannot centre-crop a skip of shape {have} to {tuple(shape)}; the input size "
            "was not checked against UNet.geometry (call UNet.forward, not the parts)"
        )
    index = (slice(None), slice(None)) + tuple(slice(d // 2, d // 2 + s) for d, s in zip(diff, shape))
    return x[index]


class UNet(nn.Module):
    """The U-Net of the paper, in 2-D or 3-D, valid or same padding, built from a spec.

    Level ``l`` has ``spec.width * 2**l`` channels; ``spec.depth`` poolings.
    Weights are initialised as in the paper: normal with std ``sqrt(2 / N)``, N the
    number of inputs of one unit; biases zero. Deterministic after
    ``torch.manual_seed``.

    Parameters
    ----------
    spec : the architecture; kept as ``.spec``. ``.geometry`` tells the sizes.

    Examples
    --------
    >>> net = UNet(ModelSpec(dims=2, padding="valid", depth=1, width=2))
    >>> net(torch.zeros(1, 1, 20, 22)).shape
    torch.Size([1, 2, 4, 6])
    """

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.geometry = UNetGeometry.from_spec(spec)
        d, w, pad = spec.dims, spec.width, spec.padding
        self.inc = DoubleConv(d, spec.in_channels, w, padding=pad)
        self.downs = nn.ModuleList(
            Down(d, w * 2**level, w * 2 ** (level + 1), padding=pad) for level in range(spec.depth)
        )
        self.ups = nn.ModuleList(
            Up(d, w * 2 ** (level + 1), w * 2**level, padding=pad) for level in reversed(range(spec.depth))
        )
        self.outc = OutConv(d, w, spec.classes)
        init_paper_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits for a batch of images.

        Parameters
        ----------
        x : tensor of shape (B, C, [Z,] Y, X), C = ``spec.in_channels``, each spatial
            size valid for ``self.geometry``.

        Returns
        -------
        tensor of shape (B, classes, [Z', ] Y', X'), spatial shape
        ``self.geometry.output_shape(x.shape[2:])``.

        Raises
        ------
        ShapeError
            For a wrong number of axes or channels, or a spatial size the net cannot
            take (the message names the nearest valid sizes).
        """
        self.check_input(tuple(x.shape))
        skips = [self.inc(x)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        x = skips.pop()
        for up in self.ups:
            x = up(x, skips.pop())
        return self.outc(x)

    def check_input(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Check an input shape (B, C, [Z,] Y, X); return the output spatial shape."""
        spec = self.spec
        axes = "(B, C, Z, Y, X)" if spec.dims == 3 else "(B, C, Y, X)"
        if len(shape) != spec.dims + 2:
            raise ShapeError(
                f"input of shape {shape} has {len(shape)} axes but the {spec.dims}-D U-Net "
                f"needs {spec.dims + 2}: {axes}; add the missing batch or channel axis"
            )
        if shape[1] != spec.in_channels:
            raise ShapeError(
                f"input of shape {shape} has {shape[1]} channels (axis 1 of {axes}) but the "
                f"model was built for {spec.in_channels}; use a matching image or model"
            )
        return self.geometry.output_shape(tuple(int(n) for n in shape[2:]))


@torch.no_grad()
def init_paper_(net: nn.Module) -> None:
    """Initialise in place as in the paper: weights ~ N(0, 2/N), biases 0.

    N is the number of inputs of one unit: ``in_channels * kernel_volume`` for a
    convolution, ``in_channels`` for the 2x2 stride-2 up-convolution (each output
    voxel sees exactly one input voxel per channel).
    """
    for module in net.modules():
        if isinstance(module, (nn.Conv2d, nn.Conv3d)):
            fan_in = module.in_channels * math.prod(module.kernel_size)
        elif isinstance(module, (nn.ConvTranspose2d, nn.ConvTranspose3d)):
            fan_in = module.in_channels
        else:
            continue
        module.weight.normal_(0.0, math.sqrt(2.0 / fan_in))
        if module.bias is not None:
            module.bias.zero_()


def probe_receptive_radius(net: UNet, size: int | None = None, *, structural: bool = True) -> int:
    """Measure how far, in input voxels, one input voxel can change the output.

    A single bright voxel is put near the centre of a zero image (once per pooling
    phase, ``2**depth`` positions, and once per axis on an image long along that
    axis and as thin as the net allows along the others), the output is compared
    with the zero image's output, and the largest distance between the bright voxel
    and a changed output voxel (mapped to input coordinates by the margin) is
    returned: the Chebyshev radius, max over axes. It runs on a float64 copy in
    eval mode; *net* is not touched.

    What it shows: with ``structural=True`` (default) the copy gets ``|weights|``
    and zero biases, so every path is positive and nothing cancels or dies in a
    ReLU: the result is the exact reach of the architecture, which must equal
    ``net.geometry.receptive_radius``. With ``structural=False`` it uses the net's
    own weights, so dead ReLUs or cancellations can only make it smaller: a lower
    bound for those weights. Neither is the *effective* receptive field of a trained
    net (how much the far voxels actually matter), which is usually much smaller.

    Parameters
    ----------
    net : the U-Net to probe.
    size : spatial size of the probe image along every axis; by default the smallest
        valid size whose output holds the whole reach.

    Returns
    -------
    int, the radius in input voxels (0 if no output changes).
    """
    geometry = net.geometry
    if size is None:
        size = geometry.valid_input_at_least(2 * geometry.receptive_radius + 2 * geometry.input_multiple + 1)
    geometry.output_size(size)
    probe = _probe_copy(net, structural=structural)
    radius = max(_probe_axis(probe, size, axis) for axis in range(net.spec.dims))
    logger.debug("probed receptive radius %d (structural=%s, size %d)", radius, structural, size)
    return radius


def _probe_axis(probe: UNet, size: int, axis: int) -> int:
    """Reach along *axis*, on an image *size* long there and as thin as the net allows elsewhere.

    The field is a box, so the other axes need only hold the bright voxel; one
    forward pass per pooling phase keeps the memory at one image.
    """
    geometry, spec = probe.geometry, probe.spec
    shape = [geometry.min_input] * spec.dims
    shape[axis] = size
    zero = torch.zeros((1, spec.in_channels, *shape), dtype=torch.float64, device=next(probe.parameters()).device)
    with torch.no_grad():
        background = probe(zero)
    start = size // 2 - geometry.input_multiple // 2
    radius = 0
    for bright in range(start, start + geometry.input_multiple):  # every pooling phase
        where = [n // 2 for n in shape]
        where[axis] = bright
        x = zero.clone()
        x[(0, slice(None), *where)] = 1.0
        with torch.no_grad():
            diff = (probe(x) - background).abs().amax(dim=(0, 1))
        changed = torch.nonzero(diff > 1e-12 * (1.0 + background.abs().amax()))[:, axis]
        if len(changed):
            radius = max(radius, int((changed + geometry.margin - bright).abs().max()))
    return radius


def _probe_copy(net: UNet, *, structural: bool) -> UNet:
    """A float64 eval copy of *net*; with *structural*, |weights| and zero biases."""
    probe = copy.deepcopy(net).to(torch.float64).eval()
    if structural:
        with torch.no_grad():
            for name, param in probe.named_parameters():
                if name.endswith("bias"):
                    param.zero_()
                else:
                    param.abs_()
    return probe
