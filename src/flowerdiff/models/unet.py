"""The denoising U-Net of chapter 15 of "Learn Generative AI with PyTorch", generalised.

With ``hidden_dims=(128, 256, 512, 1024)`` and the defaults it is the book's model: 133,417,219
parameters. Layout for hidden_dims ``d[0..n-1]`` (n >= 2), where level ``i`` runs at
``1 / 2**i`` of the input resolution (its *downsampling factor* is ``2**i``):

- down level i < n-1 runs at width d[i]: two residual blocks, each output kept as a skip;
  every level but the last downsamples to d[i+1], the last widens to d[n-1] with a 3x3 conv
  (so n-2 halvings);
- middle at d[n-1]: residual block, attention (``mid_attention``), residual block;
- up level j mirrors down level n-2-j with skip width s = d[n-2-j]: two residual blocks
  (x ++ skip -> x's width), then upsampling to s, except the last level, which narrows to s
  with a 3x3 conv; the up path therefore runs one level wider than the down path;
- out: residual block on (x ++ output of the first conv), then a 1x1 conv to the image.

Attention placement: ``attention_factors=None`` is the book's (down path at its lowest
resolution, up path at its *highest*, i.e. over all 4096 pixels at 64x64, which is most of the
book model's FLOPs); a list such as ``[4, 8]`` puts attention in both paths at exactly those
downsampling factors (ADM / DDPM++ style: 16x16 and 8x8 of a 64x64 image).

Class conditioning (``num_classes``): a learned embedding with one extra "null" row (index
``num_classes``, the unconditional model of classifier-free guidance) is added to the time
embedding, as diffusers' ``class_embed_type`` and EDM's label mapping do.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import torch
from torch import Tensor, nn

from flowerdiff.models.layers import (
    AttentionBlock,
    Downsample,
    ResidualBlock,
    SinusoidalTimeEmbedding,
    Upsample,
)


class _Level(nn.Module):
    """One resolution level: two residual blocks, optional attention, then a resampling conv."""

    def __init__(
        self, block1: ResidualBlock, block2: ResidualBlock, attn: nn.Module, resample: nn.Module
    ) -> None:
        super().__init__()
        self.block1 = block1
        self.block2 = block2
        self.attn = attn
        self.resample = resample


class UNet(nn.Module):
    """Predicts a tensor shaped like ``sample`` from a noisy image, its noise level (a timestep,
    or EDM's c_noise: any float, through the same sinusoidal embedding) and optional class labels.

    Any input whose sides are multiples of :attr:`size_multiple` works.

    Args:
        in_channels, out_channels: image channels (out defaults to in).
        hidden_dims: width per level, then the middle width (see the module docstring).
        norm_groups: GroupNorm groups (every width must be divisible by it).
        attn_heads, attn_head_dim: multi-head self-attention shape.
        attention_factors: downsampling factors with attention in both paths; None: the book's.
        mid_attention: attention in the middle block (the book: yes).
        dropout: dropout in every residual block (the book: 0).
        num_classes: number of classes for class-conditional generation; None: unconditional.
    """

    def __init__(
        self,
        in_channels: int = 3,
        hidden_dims: Sequence[int] = (128, 256, 512, 1024),
        out_channels: int | None = None,
        norm_groups: int = 8,
        attn_heads: int = 4,
        attn_head_dim: int = 32,
        attention_factors: Sequence[int] | None = None,
        mid_attention: bool = True,
        dropout: float = 0.0,
        num_classes: int | None = None,
    ) -> None:
        super().__init__()
        dims = _validate(
            hidden_dims,
            norm_groups,
            attn_heads,
            attn_head_dim,
            attention_factors,
            dropout,
            num_classes,
            in_channels,
        )
        self.in_channels = in_channels
        self.out_channels = out_channels or in_channels
        self.hidden_dims = dims
        self.num_classes = num_classes
        n_levels = len(dims) - 1
        down_attn, up_attn = _attention_levels(n_levels, attention_factors)

        temb_dim = 4 * dims[0]
        self.time_embedding = SinusoidalTimeEmbedding(dims[0])
        self.time_mlp = nn.Sequential(
            nn.Linear(dims[0], temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim)
        )
        if num_classes is not None:
            self.class_embedding = nn.Embedding(num_classes + 1, temb_dim)

        def res(cin: int, cout: int) -> ResidualBlock:
            return ResidualBlock(cin, cout, temb_dim, norm_groups, dropout)

        def attn(channels: int, on: bool) -> nn.Module:
            return AttentionBlock(channels, attn_heads, attn_head_dim) if on else nn.Identity()

        self.init_conv = nn.Conv2d(in_channels, dims[0], 3, padding=1)

        self.down = nn.ModuleList()
        for i, (width, next_width) in enumerate(pairwise(dims)):
            last = i == n_levels - 1
            self.down.append(
                _Level(
                    res(width, width),
                    res(width, width),
                    attn(width, i in down_attn),
                    nn.Conv2d(width, next_width, 3, padding=1)
                    if last
                    else Downsample(width, next_width),
                )
            )

        self.mid_block1 = res(dims[-1], dims[-1])
        self.mid_attn = attn(dims[-1], mid_attention)
        self.mid_block2 = res(dims[-1], dims[-1])

        self.up = nn.ModuleList()
        width = dims[-1]
        for j, skip in enumerate(reversed(dims[:-1])):
            last = j == n_levels - 1
            self.up.append(
                _Level(
                    res(width + skip, width),
                    res(width + skip, width),
                    attn(width, j in up_attn),
                    nn.Conv2d(width, skip, 3, padding=1) if last else Upsample(width, skip),
                )
            )
            width = skip

        self.out_block = res(2 * dims[0], dims[0])
        self.conv_out = nn.Conv2d(dims[0], self.out_channels, 1)

    @property
    def size_multiple(self) -> int:
        """Input sides must be multiples of this: the U-Net halves them len(hidden_dims) - 2
        times and every level must keep whole pixels."""
        return 2 ** (len(self.hidden_dims) - 2)

    def check_image_size(self, image_size: int) -> None:
        """Raise a ValueError naming ``data.image_size`` when this network cannot take it."""
        factor = self.size_multiple
        if (
            isinstance(image_size, bool)
            or not isinstance(image_size, int)
            or image_size <= 0
            or (image_size % factor)
        ):
            below = (image_size // factor) * factor if isinstance(image_size, int) else 0
            nearest = [s for s in (below, below + factor) if s > 0]
            raise ValueError(
                f"`data.image_size={image_size!r}` does not fit the U-Net: "
                f"model.net.hidden_dims={self.hidden_dims} has {len(self.hidden_dims)} levels, so "
                f"the network halves the resolution {len(self.hidden_dims) - 2} times and every "
                f"level must keep whole pixels. Valid values are the positive multiples of "
                f"{factor} ({factor}, {2 * factor}, {3 * factor}, ...); the nearest are "
                f"{' or '.join(map(str, nearest))}."
            )

    def forward(
        self, sample: Tensor, timesteps: Tensor | float, class_labels: Tensor | None = None
    ) -> Tensor:
        """``timesteps``: a number, 0-d or [B] tensor (long or float), broadcast over the batch.
        ``class_labels``: [B] integers in [0, num_classes]; ``num_classes`` (or None) is the
        unconditional "null" class."""
        t = torch.as_tensor(timesteps, device=sample.device).reshape(-1)
        t = t.expand(sample.shape[0])
        temb = self.time_mlp(self.time_embedding(t).to(sample.dtype))
        if self.num_classes is not None:
            if class_labels is None:
                class_labels = torch.full(
                    (sample.shape[0],), self.num_classes, dtype=torch.long, device=sample.device
                )
            temb = temb + self.class_embedding(class_labels).to(temb.dtype)
        elif class_labels is not None:
            raise ValueError(
                "class labels were given to an unconditional U-Net; train with "
                "model.net.num_classes=<number of classes> for class-conditional generation."
            )

        x = self.init_conv(sample)
        r = x
        skips: list[Tensor] = []
        for level in self.down:
            x = level.block1(x, temb)
            skips.append(x)
            x = level.attn(level.block2(x, temb))
            skips.append(x)
            x = level.resample(x)

        x = self.mid_block2(self.mid_attn(self.mid_block1(x, temb)), temb)

        for level in self.up:
            x = level.block1(torch.cat((x, skips.pop()), dim=1), temb)
            x = level.block2(torch.cat((x, skips.pop()), dim=1), temb)
            x = level.resample(level.attn(x))

        x = self.out_block(torch.cat((x, r), dim=1), temb)
        return self.conv_out(x)


def _attention_levels(n_levels: int, factors: Sequence[int] | None) -> tuple[set[int], set[int]]:
    """Indices of the down and up levels that get attention."""
    if factors is None:  # the book: lowest-resolution down level, highest-resolution up level
        return {n_levels - 1}, {n_levels - 1}
    wanted = {int(f) for f in factors}
    down = {i for i in range(n_levels) if 2**i in wanted}
    return down, {n_levels - 1 - i for i in down}  # up level j runs at down level n-1-j's size


def _validate(
    hidden_dims: Sequence[int],
    norm_groups: int,
    attn_heads: int,
    attn_head_dim: int,
    attention_factors: Sequence[int] | None,
    dropout: float,
    num_classes: int | None,
    in_channels: int,
) -> list[int]:
    """Fail at construction, with the fix in the message, rather than deep inside forward."""
    if (
        isinstance(hidden_dims, str)
        or not isinstance(hidden_dims, Sequence)
        or not all(isinstance(d, int) and not isinstance(d, bool) for d in hidden_dims)
    ):
        raise ValueError(
            f"`model.net.hidden_dims={hidden_dims!r}` must be a list of integer widths, e.g. "
            "[128, 256, 512, 1024] (the book)."
        )
    dims = list(hidden_dims)
    for key, value in (
        ("norm_groups", norm_groups),
        ("attn_heads", attn_heads),
        ("attn_head_dim", attn_head_dim),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`model.net.{key}={value!r}` must be a positive integer.")
    if len(dims) < 2:
        raise ValueError(
            f"`model.net.hidden_dims` needs at least 2 entries (level widths, then the middle "
            f"width); got {dims}."
        )
    bad = [d for d in dims if d <= 0 or d % norm_groups]
    if bad:
        raise ValueError(
            f"every entry of `model.net.hidden_dims` must be a positive multiple of "
            f"`model.net.norm_groups` ({norm_groups}), because GroupNorm splits the channels into "
            f"equal groups; got hidden_dims={dims}, where {bad} "
            f"{'is' if len(bad) == 1 else 'are'} not. Use widths divisible by {norm_groups} or a "
            "`norm_groups` that divides all of them."
        )
    if not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"`model.net.in_channels={in_channels!r}` must be a positive integer.")
    if attention_factors is not None:
        valid = [2**i for i in range(len(dims) - 1)]
        wrong = [f for f in attention_factors if f not in valid]
        if wrong:
            raise ValueError(
                f"`model.net.attention_factors={list(attention_factors)}`: {wrong} are not "
                f"downsampling factors of this U-Net. With hidden_dims={dims} the levels run at "
                f"factors {valid} (1 = full resolution); null keeps the book's placement."
            )
    if not isinstance(dropout, int | float) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"`model.net.dropout={dropout!r}` must be in [0, 1).")
    if num_classes is not None and (
        isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1
    ):
        raise ValueError(
            f"`model.net.num_classes={num_classes!r}` must be null (unconditional) or the "
            "number of classes, an integer >= 1 (Oxford 102 Flowers: 102)."
        )
    return dims
