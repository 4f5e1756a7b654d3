"""UNet: the book's exact size and layout, shapes, timestep handling, validation, gradients."""

from __future__ import annotations

import math

import pytest
import torch

from flowerdiff.models import UNet
from flowerdiff.models.layers import AttentionBlock

BOOK = {"hidden_dims": [128, 256, 512, 1024]}
SMALL = {"hidden_dims": [64, 128, 256, 512]}
TINY = {"hidden_dims": [16, 32, 32, 64], "attn_heads": 2, "attn_head_dim": 8}


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [(BOOK, 133_417_219), (SMALL, 33_600_643), (TINY, 654_243)],
    ids=["book_133m", "small", "tiny"],
)
def test_parameter_count(kwargs: dict, expected: int) -> None:
    with torch.device("meta"):  # no real weights: the 133M model costs nothing to build
        model = UNet(image_size=64, **kwargs)
    assert n_params(model) == expected


def test_book_layout_has_attention_at_the_book_levels() -> None:
    with torch.device("meta"):
        model = UNet(**BOOK)
    widths = {
        name: m.to_out.out_channels
        for name, m in model.named_modules()
        if isinstance(m, AttentionBlock)
    }
    # lowest-resolution down level (512@16), middle (1024@16), highest-resolution up level (256@64)
    assert widths == {"down.2.attn": 512, "mid_attn": 1024, "up.2.attn": 256}


def test_book_model_shape_on_meta() -> None:
    with torch.device("meta"):
        model = UNet(**BOOK)
        out = model(torch.empty(2, 3, 64, 64), torch.tensor([0, 999]))
    assert out.shape == (2, 3, 64, 64)


@pytest.mark.parametrize("size", [16, 32, 64])
def test_tiny_forward_shape(size: int) -> None:
    torch.manual_seed(0)
    model = UNet(image_size=64, **TINY)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        out = model(x, torch.tensor([1, 500]))
    assert out.shape == x.shape
    assert torch.isfinite(out).all()


def test_small_forward_shape() -> None:
    with torch.device("meta"):
        out = UNet(**SMALL)(torch.empty(2, 3, 64, 64), 10)
    assert out.shape == (2, 3, 64, 64)
    torch.manual_seed(0)
    model = UNet(image_size=32, **SMALL)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 32, 32), 10)
    assert out.shape == (1, 3, 32, 32)
    assert torch.isfinite(out).all()


def test_out_channels() -> None:
    model = UNet(in_channels=1, out_channels=2, image_size=16, **TINY)
    with torch.no_grad():
        assert model(torch.randn(1, 1, 16, 16), 3).shape == (1, 2, 16, 16)


def test_timestep_forms_agree() -> None:
    torch.manual_seed(0)
    model = UNet(image_size=16, **TINY).eval()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        ref = model(x, 42)
        for t in (
            torch.tensor(42),
            torch.tensor([42]),
            torch.full((3,), 42),
            torch.full((3,), 42.0),
        ):
            torch.testing.assert_close(model(x, t), ref)
        per_image = model(x, torch.tensor([42, 7, 42]))
    torch.testing.assert_close(per_image[[0, 2]], ref[[0, 2]])
    assert not torch.allclose(per_image[1], ref[1])


def test_attention_matches_explicit_softmax() -> None:
    """SDPA with the book's (q/k/v, head, head_dim) channel order equals the einsum form."""
    torch.manual_seed(0)
    block = AttentionBlock(channels=8, heads=2, head_dim=4)
    x = torch.randn(2, 8, 3, 5)
    q, k, v = block.to_qkv(block.norm(x)).reshape(2, 3, 2, 4, 15).unbind(1)  # [B, h, d, HW]
    attn = torch.einsum("bhdi,bhdj->bhij", q, k).mul(1 / math.sqrt(4)).softmax(-1)
    out = torch.einsum("bhij,bhdj->bhdi", attn, v).reshape(2, 8, 3, 5)
    torch.testing.assert_close(block(x), x + block.to_out(out))


def test_image_size_validation_message() -> None:
    with pytest.raises(ValueError) as err:
        UNet(image_size=62, **TINY)
    msg = str(err.value)
    assert "`image_size`" in msg
    assert "image_size=62" in msg
    assert "multiples of 4" in msg
    assert "\n" not in msg


def test_norm_groups_validation_message() -> None:
    with pytest.raises(ValueError, match=r"`norm_groups` \(8\).*\[12\] is not"):
        UNet(hidden_dims=[16, 12, 32], image_size=16)


def test_hidden_dims_needs_two_entries() -> None:
    with pytest.raises(ValueError, match="at least 2 entries"):
        UNet(hidden_dims=[64])


def test_tiny_gradients_are_finite_everywhere() -> None:
    torch.manual_seed(0)
    model = UNet(image_size=16, **TINY)
    x = torch.randn(2, 3, 16, 16)
    loss = (model(x, torch.tensor([10, 900])) - torch.randn_like(x)).abs().mean()
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
