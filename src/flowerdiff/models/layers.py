"""Building blocks of the chapter-15 U-Net of "Learn Generative AI with PyTorch" (Mark Liu).

The book's U-Net (utils/unet_util.py and utils/ch15util.py in github.com/markhliu/DGAI) is
adapted from filipbasara0/simple-diffusion. Shapes, parameter counts and the order of
operations follow it, so the default configuration reproduces its 133,417,219 parameters and
its forward computation; only the attention kernel differs (fused SDPA instead of einsum).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class SinusoidalTimeEmbedding(nn.Module):
    """Timesteps [B] -> parameter-free features [B, dim] laid out as ``[sin | cos]``.

    Frequencies are ``exp(-ln(10000) * i / (half - 1))``: the book divides by ``half - 1``, so
    the lowest frequency is exactly 1/10000 rather than the Transformer's 10000**(-(half-1)/half).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        if dim < 4 or dim % 2:
            raise ValueError(f"the time-embedding dim must be even and >= 4, got {dim}")
        self.dim = dim

    def forward(self, timesteps: Tensor) -> Tensor:
        half = self.dim // 2
        steps = torch.arange(half, dtype=torch.float32, device=timesteps.device)
        freqs = torch.exp(-math.log(10000.0) * steps / (half - 1))
        args = timesteps.float()[:, None] * freqs[None, :]
        return torch.cat([args.sin(), args.cos()], dim=-1)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 under autocast (ADM's ``GroupNorm32``).

    CUDA's autocast already runs group_norm in float32; CPU's runs it in bfloat16, which is less
    accurate and, measured on this project's CPU, 4x slower in backward. Same parameters and,
    outside autocast, exactly ``nn.GroupNorm``.
    """

    def forward(self, x: Tensor) -> Tensor:
        device = x.device.type  # the meta device has no autocast
        if not (torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)):
            return super().forward(x)  # float32, or a model cast to bf16/fp16 as a whole
        with torch.autocast(device, enabled=False):
            return super().forward(x.float()).to(x.dtype)


class ResidualBlock(nn.Module):
    """conv3x3 -> GroupNorm -> SiLU, + time projection, conv3x3 -> GroupNorm -> SiLU, + skip.

    The skip is a 1x1 conv only when the channel count changes. The time embedding passes
    through SiLU twice before its projection (once in ``forward``, once in the book's
    ``Sequential(SiLU, Linear)``); we keep that so the function matches the book exactly.
    ``dropout`` (0 in the book) acts before the second convolution, where ADM puts it.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_dim: int,
        norm_groups: int = 8,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm1 = GroupNorm32(norm_groups, out_channels)
        self.time_proj = nn.Linear(temb_dim, out_channels)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.norm2 = GroupNorm32(norm_groups, out_channels)
        self.shortcut = (
            nn.Conv2d(in_channels, out_channels, 1)
            if in_channels != out_channels
            else nn.Identity()
        )

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = F.silu(self.norm1(self.conv1(x)))
        h = h + self.time_proj(F.silu(F.silu(temb)))[:, :, None, None]
        h = F.silu(self.norm2(self.conv2(self.dropout(h))))
        return h + self.shortcut(x)


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel axis of [B, C, H, W] with a gain and no bias (as in the book).

    eps is 1e-5 in float32 and 1e-3 in lower precision, as in the book, because a half-precision
    variance can underflow and a larger eps keeps rsqrt bounded.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))

    def forward(self, x: Tensor) -> Tensor:
        eps = 1e-5 if x.dtype == torch.float32 else 1e-3
        var, mean = torch.var_mean(x, dim=1, correction=0, keepdim=True)
        return (x - mean) * torch.rsqrt(var + eps) * self.weight[:, None, None]


class AttentionBlock(nn.Module):
    """Pre-norm, residual multi-head self-attention over all H*W positions.

    ``F.scaled_dot_product_attention`` lets fused (flash / memory-efficient) kernels avoid
    materialising the [HW, HW] score matrix, which at 64x64 holds 4096 x 4096 entries per head.
    Its default scale 1/sqrt(head_dim) is the book's.
    """

    def __init__(self, channels: int, heads: int = 4, head_dim: int = 32) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = head_dim
        inner = heads * head_dim
        self.norm = ChannelLayerNorm(channels)
        self.to_qkv = nn.Conv2d(channels, 3 * inner, 1, bias=False)
        self.to_out = nn.Conv2d(inner, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        qkv = self.to_qkv(self.norm(x))
        # Channels are ordered (q/k/v, head, head_dim), as in the book's rearrange; fused kernels
        # need the head_dim axis contiguous, hence the copy.
        qkv = qkv.reshape(b, 3, self.heads, self.head_dim, h * w).transpose(-1, -2).contiguous()
        out = _attention(*qkv.unbind(1))  # [B, heads, HW, head_dim]
        out = out.transpose(-1, -2).reshape(b, self.heads * self.head_dim, h, w)
        return x + self.to_out(out)


def _attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Fused attention; on the CPU in float32 even under bfloat16 autocast, whose CPU flash kernel
    is ~7x slower in backward than the float32 one (measured). GPUs keep their bf16 kernels."""
    if q.device.type != "cpu" or q.dtype == torch.float32:
        return F.scaled_dot_product_attention(q, k, v)
    with torch.autocast("cpu", enabled=False):
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(q.dtype)


class Downsample(nn.Sequential):
    """Halve H and W without discarding pixels: 2x2 space-to-depth, then a 1x1 conv."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(nn.PixelUnshuffle(2), nn.Conv2d(4 * in_channels, out_channels, 1))


class Upsample(nn.Sequential):
    """Double H and W: nearest-neighbour x2, then a 3x3 conv to smooth the blocky result."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(in_channels, out_channels, 3, padding=1),
        )
