"""The denoising U-Net of chapter 15 of "Learn Generative AI with PyTorch", generalised.

With ``hidden_dims=(128, 256, 512, 1024)`` and 64x64 RGB images it is the book's model:
133,417,219 parameters. Layout for hidden_dims ``d[0..n-1]`` (n >= 2):

- down level i < n-1 runs at width d[i]: two residual blocks, each output kept as a skip;
  the last level adds attention after its second block (before that skip is kept) and widens
  to d[n-1] with a 3x3 conv; every other level downsamples to d[i+1] (so n-2 halvings);
- middle at d[n-1]: residual block, attention, residual block;
- up level j mirrors it with skip width s = d[n-2-j]: two residual blocks (x ++ skip -> x's
  width), then upsampling to s, except the last level, which has attention and narrows to s
  with a 3x3 conv; the up path therefore runs one level wider than the down path;
- out: residual block on (x ++ output of the first conv), then a 1x1 conv to the image.
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
    """Predicts a tensor shaped like ``sample`` (noise, v or x0) from a noisy image and timestep.

    ``image_size`` is the training resolution (kept for samplers); any input whose sides are
    multiples of ``2 ** (len(hidden_dims) - 2)`` works, e.g. 16x16 tests on a 64x64 model.
    """

    def __init__(
        self,
        in_channels: int = 3,
        hidden_dims: Sequence[int] = (128, 256, 512, 1024),
        image_size: int = 64,
        out_channels: int | None = None,
        norm_groups: int = 8,
        attn_heads: int = 4,
        attn_head_dim: int = 32,
    ) -> None:
        super().__init__()
        dims = [int(d) for d in hidden_dims]
        _validate(dims, image_size, norm_groups)
        self.in_channels = in_channels
        self.out_channels = out_channels or in_channels
        self.hidden_dims = dims
        self.image_size = image_size

        temb_dim = 4 * dims[0]
        self.time_embedding = SinusoidalTimeEmbedding(dims[0])
        self.time_mlp = nn.Sequential(
            nn.Linear(dims[0], temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim)
        )

        def res(cin: int, cout: int) -> ResidualBlock:
            return ResidualBlock(cin, cout, temb_dim, norm_groups)

        def attn(channels: int) -> AttentionBlock:
            return AttentionBlock(channels, attn_heads, attn_head_dim)

        self.init_conv = nn.Conv2d(in_channels, dims[0], 3, padding=1)

        n_levels = len(dims) - 1
        self.down = nn.ModuleList()
        for i, (width, next_width) in enumerate(pairwise(dims)):
            last = i == n_levels - 1
            self.down.append(
                _Level(
                    res(width, width),
                    res(width, width),
                    attn(width) if last else nn.Identity(),
                    nn.Conv2d(width, next_width, 3, padding=1)
                    if last
                    else Downsample(width, next_width),
                )
            )

        self.mid_block1 = res(dims[-1], dims[-1])
        self.mid_attn = attn(dims[-1])
        self.mid_block2 = res(dims[-1], dims[-1])

        self.up = nn.ModuleList()
        width = dims[-1]
        for j, skip in enumerate(reversed(dims[:-1])):
            last = j == n_levels - 1
            self.up.append(
                _Level(
                    res(width + skip, width),
                    res(width + skip, width),
                    attn(width) if last else nn.Identity(),
                    nn.Conv2d(width, skip, 3, padding=1) if last else Upsample(width, skip),
                )
            )
            width = skip

        self.out_block = res(2 * dims[0], dims[0])
        self.conv_out = nn.Conv2d(dims[0], self.out_channels, 1)

    def forward(self, sample: Tensor, timesteps: Tensor | int) -> Tensor:
        """``timesteps``: int, 0-d or [B] tensor (long or float), broadcast over the batch."""
        t = torch.as_tensor(timesteps, device=sample.device).reshape(-1)
        t = t.expand(sample.shape[0])
        temb = self.time_mlp(self.time_embedding(t).to(sample.dtype))

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


def _validate(dims: list[int], image_size: int, norm_groups: int) -> None:
    """Fail at construction, with the fix in the message, rather than deep inside forward."""
    if len(dims) < 2:
        raise ValueError(
            f"`hidden_dims` needs at least 2 entries (level widths, then the middle width); "
            f"got {dims}."
        )
    bad = [d for d in dims if d <= 0 or d % norm_groups]
    if norm_groups <= 0 or bad:
        raise ValueError(
            f"every entry of `hidden_dims` must be a positive multiple of `norm_groups` "
            f"({norm_groups}), because GroupNorm splits the channels into equal groups; got "
            f"hidden_dims={dims}, where {bad} {'is' if len(bad) == 1 else 'are'} not. Use "
            f"widths divisible by {norm_groups} or a `norm_groups` that divides all of them."
        )
    factor = 2 ** (len(dims) - 2)
    if image_size <= 0 or image_size % factor:
        raise ValueError(
            f"`image_size` must be a positive multiple of {factor}: hidden_dims={dims} has "
            f"{len(dims)} entries, so the U-Net halves the resolution {len(dims) - 2} times and "
            f"every level must keep whole pixels. Got image_size={image_size}; valid values are "
            f"the positive multiples of {factor} ({factor}, {2 * factor}, {3 * factor}, ...)."
        )
