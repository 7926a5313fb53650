"""What sizes the U-Net takes and gives: pure integer code, no torch.

The architecture is the paper's: per level two 3x3 convolutions (each followed by
ReLU), 2x2 max pooling with stride 2 going down, 2x2 up-convolution with stride 2
going up, skips concatenated (centre-cropped in ``valid`` mode). One axis at a time,
for ``depth`` 1 and ``valid`` padding::

    n ──conv3, conv3──> n-4 ───────── skip, cropped by 4 each side ─────────┐
                         │ pool2 (n-4 must be even)                          │
                         v                                                   v
                       (n-4)/2 ──conv3, conv3──> (n-12)/2 ──upconv2──> n-12 + n-12
                                                                             │ conv3, conv3
                                                                             v
                                                                           n-16

so the margin is 8 at each side and the input must be even. ``same`` padding keeps
every size, so the only rule is that each pooled size is even: the input must be a
multiple of ``2**depth``.

Nothing here hard-codes a number another room needs: the margin, the input multiple
and the receptive field all come from :class:`UNetGeometry`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from unetflow.config import PADDINGS, choose
from unetflow.errors import ConfigError, ShapeError

if TYPE_CHECKING:
    from unetflow.config import ModelSpec

KERNEL = 3  # every convolution on the paths is 3x3(x3)
CONVS_PER_LEVEL = 2  # (conv3x3 => ReLU) * 2
POOL = 2  # 2x2 max pooling, stride 2; the up-convolution is 2x2, stride 2


@dataclass(frozen=True)
class UNetGeometry:
    """Input and output sizes, margin and receptive field of one U-Net, per axis.

    Every axis follows the same rule, so methods take one size ``n``;
    :meth:`output_shape` applies the rule to a whole spatial shape ``([Z,] Y, X)``.

    Parameters
    ----------
    dims : 2 or 3 spatial dimensions.
    padding : ``valid`` (unpadded convolutions, output smaller by ``2 * margin``)
        or ``same`` (output size = input size).
    depth : number of 2x poolings.

    Examples
    --------
    The paper's net (depth 4, unpadded):

    >>> g = UNetGeometry(2, "valid", 4)
    >>> g.output_size(572), g.margin, g.input_multiple
    (388, 92, 16)
    >>> UNetGeometry(3, "same", 2).output_shape((8, 16, 12))
    (8, 16, 12)
    """

    dims: int
    padding: str
    depth: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "padding", choose(self.padding, PADDINGS, what="padding"))
        if self.dims not in (2, 3):
            raise ConfigError(f"model dims {self.dims} is not 2 or 3; pass --dims 2 or --dims 3")
        if not 0 <= self.depth <= 6:
            raise ConfigError(f"model depth {self.depth} must be between 0 and 6")

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> UNetGeometry:
        """The geometry of the net that *spec* describes (only dims, padding, depth matter)."""
        return cls(spec.dims, spec.padding, spec.depth)

    # -- the basic numbers -------------------------------------------------------

    @property
    def input_multiple(self) -> int:
        """Step between valid input sizes: ``2**depth``.

        >>> UNetGeometry(2, "same", 3).input_multiple
        8
        """
        return POOL**self.depth

    @property
    def _conv_loss(self) -> int:
        """Voxels one DoubleConv removes along an axis (4 in valid mode, 0 in same)."""
        return CONVS_PER_LEVEL * (KERNEL - 1) if self.padding == "valid" else 0

    @property
    def margin(self) -> int:
        """``(input - output) / 2``: the context lost at each side (valid), 0 for same.

        The same for every valid input size. In valid mode it equals the symmetric
        (convolution) part of the receptive field; see :attr:`receptive_radius`.

        >>> [UNetGeometry(2, "valid", d).margin for d in range(5)]
        [2, 8, 20, 44, 92]
        >>> UNetGeometry(2, "same", 4).margin
        0
        """
        loss, m = self._conv_loss, self.input_multiple
        # input = m*b + loss*(2m - 1), output = m*b - loss*(m - 1)  (b: bottom size)
        return loss * (3 * m - 2) // 2

    @property
    def min_input(self) -> int:
        """Smallest input size the net takes along one axis.

        >>> UNetGeometry(2, "valid", 4).min_input, UNetGeometry(2, "same", 4).min_input
        (188, 16)
        """
        loss, m = self._conv_loss, self.input_multiple
        # the bottom size b must leave an output of at least one voxel
        bottom = max(1, math.ceil((1 + loss * (m - 1)) / m))
        return m * bottom + loss * (2 * m - 1)

    # -- sizes -------------------------------------------------------------------

    def is_valid_input(self, n: int) -> bool:
        """Whether the net takes an input of size *n* along one axis.

        >>> g = UNetGeometry(2, "valid", 4)
        >>> g.is_valid_input(572), g.is_valid_input(573)
        (True, False)
        """
        return n >= self.min_input and (n - self.min_input) % self.input_multiple == 0

    def nearest_valid_inputs(self, n: int) -> tuple[int | None, int]:
        """The largest valid size ``<= n`` (None if there is none) and the smallest ``>= n``.

        Both are *n* itself when *n* is valid.

        >>> UNetGeometry(2, "valid", 4).nearest_valid_inputs(573)
        (572, 588)
        >>> UNetGeometry(2, "same", 2).nearest_valid_inputs(2)
        (None, 4)
        """
        if n <= self.min_input:
            return (self.min_input if n == self.min_input else None), self.min_input
        steps, rest = divmod(n - self.min_input, self.input_multiple)
        below = self.min_input + steps * self.input_multiple
        return below, below if rest == 0 else below + self.input_multiple

    def output_size(self, n: int) -> int:
        """Output size along one axis for an input of size *n*.

        Raises
        ------
        ShapeError
            If the net cannot take *n*; the message says why and names the nearest
            valid sizes below and above.

        Examples
        --------
        >>> UNetGeometry(2, "valid", 4).output_size(572)
        388
        >>> UNetGeometry(2, "valid", 1).output_size(19)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        unetflow.errors.ShapeError: input size 19 does not fit ...; use 18 or 20 (...)
        """
        return self._trace(n, what="input size")

    def output_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Output spatial shape for an input spatial shape ``([Z,] Y, X)``.

        >>> UNetGeometry(2, "valid", 1).output_shape((20, 22))
        (4, 6)
        """
        if len(shape) != self.dims:
            raise ShapeError(
                f"spatial shape {tuple(shape)} has {len(shape)} axes but the U-Net is "
                f"{self.dims}-D; give {self.dims} sizes"
            )
        names = ("z", "y", "x")[-self.dims :]
        return tuple(self._trace(int(n), what=f"input size {ax}=") for n, ax in zip(shape, names))

    def valid_input_at_least(self, n: int) -> int:
        """Smallest valid input size whose output is at least *n* voxels.

        >>> UNetGeometry(2, "valid", 4).valid_input_at_least(388)
        572
        >>> UNetGeometry(2, "same", 4).valid_input_at_least(100)
        112
        """
        return self.nearest_valid_inputs(max(int(n), 1) + 2 * self.margin)[1]

    def input_size_for_output(self, out: int) -> int:
        """Input size that gives exactly *out* output voxels along one axis.

        Raises
        ------
        ShapeError
            If no input gives *out*; the message names the nearest output sizes.

        >>> UNetGeometry(2, "valid", 4).input_size_for_output(388)
        572
        """
        n = int(out) + 2 * self.margin
        if self.is_valid_input(n):
            return n
        below, above = self.nearest_valid_inputs(n)
        near = [s - 2 * self.margin for s in (below, above) if s is not None]
        raise ShapeError(
            f"output size {out} cannot be produced by the {self.padding} U-Net of depth "
            f"{self.depth} (outputs come in steps of {self.input_multiple}); "
            f"use output size {' or '.join(map(str, near))}"
        )

    def _trace(self, n: int, *, what: str) -> int:
        """Follow one axis through the net; raise ShapeError at the first step that fails."""
        loss, size, why = self._conv_loss, int(n), ""
        for level in range(self.depth + 1):
            size -= loss
            if size < 1:
                why = f"the convolutions of level {level} leave no voxels"
                break
            if level < self.depth and size % POOL:
                why = f"level {level} gives an odd size {size} before 2x2 pooling"
                break
            if level < self.depth:
                size //= POOL
        else:
            for _ in range(self.depth):
                size = POOL * size - loss
            if size >= 1:
                return size
            why = "the expanding path leaves no voxels"
        below, above = self.nearest_valid_inputs(n)
        near = f"{below} or {above}" if below is not None else f"at least {above}"
        sep = "" if what.endswith("=") else " "
        raise ShapeError(
            f"{what}{sep}{n} does not fit the {self.padding} U-Net of depth {self.depth}: "
            f"{why}; use {near} (valid sizes are {self.min_input} + k*{self.input_multiple})"
        )

    # -- receptive field -----------------------------------------------------------

    def _field(self, j: int) -> tuple[int, int]:
        """Input interval ``[lo, hi]`` (valid-mode coordinates) that can change output *j*.

        Walks back from output voxel *j* through every layer, one integer interval per
        feature map: a valid 3-conv maps ``[a, b]`` to ``[a, b + 2]``, a 2x2 pool to
        ``[2a, 2b + 1]``, the 2x2 stride-2 up-conv to ``[a // 2, b // 2]`` (each output
        voxel reads one input voxel), and a concatenation takes the union of the
        up-sampled path and the cropped skip. Padding does not change the field, so
        ``same`` nets use the same walk (their coordinates differ by a shift only).
        """
        return self._decoder_field(0, j, j)

    def _decoder_field(self, level: int, lo: int, hi: int) -> tuple[int, int]:
        """Input interval behind ``[lo, hi]`` of the DoubleConv output of decoder *level*."""
        if level == self.depth:
            return self._encoder_field(level, lo, hi)
        loss, crop = CONVS_PER_LEVEL * (KERNEL - 1), self._skip_crops()[level]
        lo, hi = lo, hi + loss  # back through (conv3x3 => ReLU) * 2
        skip = self._encoder_field(level, lo + crop, hi + crop)
        up = self._decoder_field(level + 1, lo // POOL, hi // POOL)
        return min(skip[0], up[0]), max(skip[1], up[1])

    def _encoder_field(self, level: int, lo: int, hi: int) -> tuple[int, int]:
        """Input interval behind ``[lo, hi]`` of the DoubleConv output of encoder *level*."""
        hi += CONVS_PER_LEVEL * (KERNEL - 1)
        for _ in range(level):
            lo, hi = POOL * lo, POOL * hi + POOL - 1
            hi += CONVS_PER_LEVEL * (KERNEL - 1)
        return lo, hi

    def _skip_crops(self) -> list[int]:
        """Valid-mode crop at each side of the skip of each level (constant in the input size)."""
        loss, m = CONVS_PER_LEVEL * (KERNEL - 1), self.input_multiple
        sizes, size = [], 2 * m + loss * (2 * m - 1)  # an input with bottom size 2
        for _level in range(self.depth + 1):
            size -= loss
            sizes.append(size)
            size //= POOL
        up = sizes[-1]
        crops = [0] * self.depth
        for level in reversed(range(self.depth)):
            crops[level] = (sizes[level] - POOL * up) // 2
            up = POOL * up - loss
        return crops

    def _fields(self) -> list[tuple[int, int]]:
        """``(left reach, right reach)`` of the field of output voxels ``0 .. 2**depth - 1``.

        The field depends on a voxel's position modulo ``2**depth`` (its pooling
        phase) only, so these cover every output voxel.
        """
        margin = CONVS_PER_LEVEL * (KERNEL - 1) * (3 * self.input_multiple - 2) // 2
        reaches = []
        for j in range(self.input_multiple):
            lo, hi = self._field(j)
            reaches.append((j + margin - lo, hi - j - margin))
        return reaches

    @property
    def receptive_field(self) -> int:
        """Extent, in input voxels along one axis, of the input that can change one output voxel.

        The largest over all output voxels: the field depends on a voxel's pooling
        phase (position modulo ``2**depth``), and from depth 3 on its extent does too.
        The same for valid and same padding (padding does not change the field). The
        textbook jump formula (``1 + sum (k - 1) * jump``, here ``2 * margin_valid +
        2**depth``) gives the phase average, not the largest.

        >>> [UNetGeometry(2, "valid", d).receptive_field for d in range(6)]
        [5, 18, 44, 100, 204, 412]
        """
        return max(left + right + 1 for left, right in self._fields())

    @property
    def receptive_radius(self) -> int:
        """How far from an output voxel's centre its receptive field reaches, worst case.

        The halo that makes every output voxel, whatever its position, independent of
        anything beyond it. It is *not* ``(receptive_field - 1) // 2``: the field is
        off-centre by up to ``2**depth - 1`` voxels depending on the pooling phase, and
        the radius is ``margin_valid + 2**depth - 1``. So for a valid net the radius
        exceeds the margin (except at depth 0); the margin alone suffices for exact
        valid tiling only because tiles start on multiples of :attr:`input_multiple`,
        which keeps every tile in the whole image's pooling phase.

        >>> [UNetGeometry(2, "valid", d).receptive_radius for d in range(5)]
        [2, 9, 23, 51, 107]
        """
        return max(max(left, right) for left, right in self._fields())

    def describe(self) -> dict[str, Any]:
        """All of the numbers, as a plain dict for ``unetflow model info``.

        >>> UNetGeometry(2, "valid", 1).describe()["margin"]
        8
        """
        return {
            "dims": self.dims,
            "padding": self.padding,
            "depth": self.depth,
            "input_multiple": self.input_multiple,
            "min_input": self.min_input,
            "min_output": self.output_size(self.min_input),
            "margin": self.margin,
            "receptive_field": self.receptive_field,
            "receptive_radius": self.receptive_radius,
            "tile_origin_multiple": self.input_multiple,
        }


# Activation values kept per voxel and first-level channel at each level of a forward
# pass (the two convolutions' outputs, the skip, the up-convolution and the
# concatenation going up, ReLUs in place): the one estimate of activation memory.
ACTIVATIONS_PER_CHANNEL = 6


def activation_bytes(width: int, depth: int, patch: tuple[int, ...], *, itemsize: int = 4) -> int:
    """Bytes of activations of one patch through a U-Net of *width* and *depth*.

    >>> activation_bytes(8, 0, (4, 4))
    3072
    """
    voxels = math.prod(patch)
    dims = len(patch)
    return sum(ACTIVATIONS_PER_CHANNEL * width * 2**lvl * voxels // 2 ** (dims * lvl) for lvl in range(depth + 1)) * itemsize
