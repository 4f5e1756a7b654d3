"""UNet: the book's exact size, layout and function, attention placement, dropout, class
conditioning, shapes, timestep handling, validation, gradients."""

from __future__ import annotations

import hashlib
import math

import pytest
import torch
from torch import Tensor

from flowerdiff.models import NETWORKS, UNet
from flowerdiff.models.layers import AttentionBlock, GroupNorm32

BOOK = {"hidden_dims": [128, 256, 512, 1024]}
SMALL = {"hidden_dims": [64, 128, 256, 512]}
TINY = {"hidden_dims": [16, 32, 32, 64], "attn_heads": 2, "attn_head_dim": 8}
# Five levels, so that downsampling factors 1, 2, 4 and 8 exist (ADM-style placement).
DEEP = {"hidden_dims": [16, 16, 32, 32, 64], "attn_heads": 2, "attn_head_dim": 8}
PARAMS = {"book_133m": 133_417_219, "small": 33_600_643, "tiny": 654_243}
PRESETS = {"book_133m": BOOK, "small": SMALL, "tiny": TINY}

# sha256 of sorted (state-dict key, shape) pairs of the pre-refactor U-Net (commit 52dd3c2,
# src/flowerdiff/models/unet.py), measured with that code: checkpoints of the book's model
# and of the other presets load unchanged. 196 keys each.
STATE_DICT_FINGERPRINTS = {
    "book_133m": "4642bef467015603e9f5bc05b76b8ebcffb5f7a19e2ef7d340c30a07be73de70",
    "small": "1af558167532c730975bb4280ae143a6c8cdf11f53ca51a5f54d44cf869ba91d",
    "tiny": "f30b2cb263a055c0224a2aef5a35237f4aa08e08c1570f85b56c323f5874f130",
}


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def fingerprint(model: torch.nn.Module) -> tuple[int, str]:
    items = sorted((key, tuple(value.shape)) for key, value in model.state_dict().items())
    return len(items), hashlib.sha256(repr(items).encode()).hexdigest()


def attention_sites(model: UNet, size: int) -> dict[str, int]:
    """Module name -> the spatial side at which each attention block actually runs (forward
    hooks on a real forward pass, so placement is checked by where attention sees tensors)."""
    sites: dict[str, int] = {}
    hooks = [
        module.register_forward_hook(
            lambda m, args, out, name=name: sites.__setitem__(name, args[0].shape[-1])
        )
        for name, module in model.named_modules()
        if isinstance(module, AttentionBlock)
    ]
    with torch.no_grad():
        model(torch.zeros(1, model.in_channels, size, size), 3)
    for hook in hooks:
        hook.remove()
    return sites


# ---------------------------------------------------------------------------------------------
# The book's model, unchanged


@pytest.mark.parametrize("preset", list(PRESETS))
def test_parameter_count_and_state_dict_keys_unchanged(preset: str) -> None:
    """attention_factors=None, dropout=0, num_classes=None: the pre-refactor networks exactly
    (same parameter count, same state-dict keys and shapes)."""
    with torch.device("meta"):  # no real weights: the 133M model costs nothing to build
        model = UNet(**PRESETS[preset])
        explicit = UNet(**PRESETS[preset], attention_factors=None, dropout=0.0, num_classes=None)
    assert n_params(model) == n_params(explicit) == PARAMS[preset]
    assert fingerprint(model) == fingerprint(explicit) == (196, STATE_DICT_FINGERPRINTS[preset])


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


def test_tiny_output_is_the_pre_refactor_function() -> None:
    """Same seed, same initialisation, same forward: a fingerprint of the tiny U-Net's output
    measured with the pre-refactor code (commit 52dd3c2). Sums over 1536 outputs of a fixed
    input; float32 summation order may differ across BLAS builds, hence rel 1e-4."""
    torch.manual_seed(0)
    model = UNet(**TINY)
    x = torch.linspace(-1, 1, 2 * 3 * 16 * 16).reshape(2, 3, 16, 16)
    with torch.no_grad():
        out = model(x, torch.tensor([3, 700])).double()
    assert out.sum().item() == pytest.approx(64.39776038611308, rel=1e-4)
    assert out.abs().sum().item() == pytest.approx(491.30982884624973, rel=1e-4)
    torch.testing.assert_close(
        out[0, 0, 0, :4].float(), torch.tensor([0.3089, 0.0770, 0.1758, 0.0947]), atol=1e-4, rtol=0
    )


def test_registry_builds_the_unet_by_name() -> None:
    with torch.device("meta"):
        model = NETWORKS.build({"name": "unet", **TINY})
    assert isinstance(model, UNet) and n_params(model) == PARAMS["tiny"]
    with pytest.raises(ValueError, match=r"`model.net.name='resnet'` is not a known network"):
        NETWORKS.build({"name": "resnet"})
    with pytest.raises(ValueError, match=r"`model.net.image_size` is not a parameter of UNet"):
        NETWORKS.build({"name": "unet", "image_size": 64, **TINY})


# ---------------------------------------------------------------------------------------------
# Attention placement


def test_book_placement_runs_attention_at_the_lowest_and_highest_resolution() -> None:
    """None is the book's: the last down level and the middle at 1/4 of the input, the last
    up level at full resolution (4096 tokens at 64x64)."""
    torch.manual_seed(0)
    assert attention_sites(UNet(**TINY), 32) == {"down.2.attn": 8, "mid_attn": 8, "up.2.attn": 32}


def test_attention_factors_place_attention_in_both_paths_at_those_factors_only() -> None:
    """[4, 8] on a 5-level U-Net at 32x32: attention at 8x8 and 4x4 on the way down and on
    the way up, plus the middle; none at full or half resolution."""
    torch.manual_seed(0)
    model = UNet(**DEEP, attention_factors=[4, 8])
    sites = attention_sites(model, 32)
    assert sites == {
        "down.2.attn": 8,
        "down.3.attn": 4,
        "mid_attn": 4,
        "up.0.attn": 4,
        "up.1.attn": 8,
    }
    assert attention_sites(UNet(**DEEP, attention_factors=[1]), 32) == {
        "down.0.attn": 32,
        "mid_attn": 4,
        "up.3.attn": 32,
    }
    no_mid = UNet(**DEEP, attention_factors=[], mid_attention=False)
    assert attention_sites(no_mid, 32) == {}
    # Fewer attention blocks, fewer parameters; the rest of the network is the same.
    book = UNet(**DEEP)
    assert n_params(no_mid) < n_params(book) < n_params(model)
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32), torch.tensor([1, 900])).shape == (2, 3, 32, 32)


def test_invalid_attention_factors_name_the_valid_ones() -> None:
    with pytest.raises(ValueError) as err:
        UNet(**TINY, attention_factors=[4, 8])
    message = str(err.value)
    assert message.startswith("`model.net.attention_factors=[4, 8]`: [8] are not downsampling")
    assert "factors [1, 2, 4]" in message and "null keeps the book's placement" in message
    with pytest.raises(ValueError, match=r"\[3\] are not downsampling factors"):
        UNet(**DEEP, attention_factors=[3])


# ---------------------------------------------------------------------------------------------
# Dropout


def test_dropout_is_identity_at_zero_and_active_only_in_train_mode() -> None:
    torch.manual_seed(0)
    plain = UNet(**TINY)
    assert not any(isinstance(m, torch.nn.Dropout) for m in plain.modules())
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([5, 600])
    with torch.no_grad():
        assert torch.equal(plain.train()(x, t), plain.eval()(x, t))  # no dropout, no batch stats
    dropped = UNet(**TINY, dropout=0.5)
    # One per residual block: 3 down levels x 2 + 2 middle + 3 up levels x 2 + the output one.
    assert sum(isinstance(m, torch.nn.Dropout) for m in dropped.modules()) == 15
    dropped.load_state_dict(plain.state_dict())  # dropout adds no parameters
    with torch.no_grad():
        torch.testing.assert_close(dropped.eval()(x, t), plain.eval()(x, t), atol=0, rtol=0)
        dropped.train()
        torch.manual_seed(1)
        first = dropped(x, t)
        torch.manual_seed(2)
        second = dropped(x, t)
    assert not torch.allclose(first, second, atol=1e-4)
    assert not torch.allclose(first, plain(x, t), atol=1e-4)
    with pytest.raises(ValueError, match=r"`model.net.dropout=1.0` must be in \[0, 1\)"):
        UNet(**TINY, dropout=1.0)


# ---------------------------------------------------------------------------------------------
# Class conditioning


@pytest.mark.parametrize("preset", list(PRESETS))
def test_class_embedding_adds_exactly_k_plus_one_rows(preset: str) -> None:
    """num_classes=K adds one embedding of (K + 1) x temb_dim (the null row included), with
    temb_dim = 4 * hidden_dims[0]; nothing else changes."""
    kwargs = PRESETS[preset]
    temb_dim = 4 * kwargs["hidden_dims"][0]
    with torch.device("meta"):
        conditional = UNet(**kwargs, num_classes=102)
    assert n_params(conditional) == PARAMS[preset] + 103 * temb_dim
    keys = set(conditional.state_dict())
    with torch.device("meta"):
        assert keys - set(UNet(**kwargs).state_dict()) == {"class_embedding.weight"}


def null_and_other_labels() -> tuple[UNet, Tensor, Tensor]:
    torch.manual_seed(0)
    return UNet(**TINY, num_classes=4).eval(), torch.randn(4, 3, 16, 16), torch.tensor([9] * 4)


def test_null_label_is_the_unconditional_model_and_labels_matter() -> None:
    model, x, t = null_and_other_labels()
    with torch.no_grad():
        unconditional = model(x, t)
        torch.testing.assert_close(model(x, t, torch.full((4,), 4)), unconditional)
        labelled = model(x, t, torch.tensor([0, 1, 2, 3]))
    for i in range(4):
        assert not torch.allclose(labelled[i], unconditional[i], atol=1e-4)
    assert not torch.allclose(labelled[0], labelled[1], atol=1e-4)
    # The label acts through the time embedding only: image i depends on its own label.
    with torch.no_grad():
        mixed = model(x, t, torch.tensor([0, 4, 2, 4]))
    torch.testing.assert_close(mixed[[0, 2]], labelled[[0, 2]])
    torch.testing.assert_close(mixed[[1, 3]], unconditional[[1, 3]])


def test_labels_for_an_unconditional_net_raise() -> None:
    model = UNet(**TINY)
    with pytest.raises(ValueError, match=r"class labels were given to an unconditional U-Net"):
        model(torch.zeros(1, 3, 16, 16), 3, torch.tensor([0]))
    with pytest.raises(ValueError, match=r"`model.net.num_classes=0` must be null"):
        UNet(**TINY, num_classes=0)


# ---------------------------------------------------------------------------------------------
# Shapes, timesteps, validation, gradients


def test_book_model_shape_on_meta() -> None:
    with torch.device("meta"):
        model = UNet(**BOOK)
        out = model(torch.empty(2, 3, 64, 64), torch.tensor([0, 999]))
    assert out.shape == (2, 3, 64, 64)


@pytest.mark.parametrize("size", [16, 32, 64])
def test_tiny_forward_shape(size: int) -> None:
    torch.manual_seed(0)
    model = UNet(**TINY)
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
    model = UNet(**SMALL)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 32, 32), 10)
    assert out.shape == (1, 3, 32, 32)
    assert torch.isfinite(out).all()


def test_out_channels() -> None:
    model = UNet(in_channels=1, out_channels=2, **TINY)
    with torch.no_grad():
        assert model(torch.randn(1, 1, 16, 16), 3).shape == (1, 2, 16, 16)


def test_timestep_forms_agree() -> None:
    """Integer, 0-d, [1], [B] and float timesteps (EDM's c_noise is a float) all broadcast."""
    torch.manual_seed(0)
    model = UNet(**TINY).eval()
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
        c_noise = model(x, torch.full((3,), math.log(0.002) / 4))
    torch.testing.assert_close(per_image[[0, 2]], ref[[0, 2]])
    assert not torch.allclose(per_image[1], ref[1])
    assert torch.isfinite(c_noise).all() and not torch.allclose(c_noise, ref)


def test_attention_matches_explicit_softmax() -> None:
    """SDPA with the book's (q/k/v, head, head_dim) channel order equals the einsum form."""
    torch.manual_seed(0)
    block = AttentionBlock(channels=8, heads=2, head_dim=4)
    x = torch.randn(2, 8, 3, 5)
    q, k, v = block.to_qkv(block.norm(x)).reshape(2, 3, 2, 4, 15).unbind(1)  # [B, h, d, HW]
    attn = torch.einsum("bhdi,bhdj->bhij", q, k).mul(1 / math.sqrt(4)).softmax(-1)
    out = torch.einsum("bhij,bhdj->bhdi", attn, v).reshape(2, 8, 3, 5)
    torch.testing.assert_close(block(x), x + block.to_out(out))


def test_norm_and_attention_compute_in_float32_under_cpu_bf16_autocast(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """CPU autocast would run GroupNorm and attention in bfloat16 (slower in backward on the CPU,
    and coarser); ours compute them in float32 and hand back the input's dtype. In float32,
    GroupNorm32 is nn.GroupNorm exactly."""
    torch.manual_seed(0)
    norm = GroupNorm32(4, 16)
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(2, 16, 8, 8) * 3 + 1
    plain = torch.nn.GroupNorm(4, 16)
    plain.load_state_dict(norm.state_dict())
    torch.testing.assert_close(norm(x), plain(x), rtol=0, atol=0)
    low = x.bfloat16()
    exact = torch.nn.functional.group_norm(low.float(), 4, norm.weight, norm.bias)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, autocast_default = norm(low), plain(low)
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours, exact.bfloat16(), rtol=0, atol=0)
    assert not torch.equal(autocast_default.bfloat16(), exact.bfloat16())
    # A model cast to bf16 as a whole (no autocast) keeps working in bf16, as nn.GroupNorm does.
    torch.testing.assert_close(norm.bfloat16()(low), plain.bfloat16()(low), rtol=0, atol=0)
    norm.float()

    block = AttentionBlock(channels=16, heads=2, head_dim=8)
    seen: list[torch.dtype] = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording(q: Tensor, *args: Tensor, **kwargs: object) -> Tensor:
        seen.append(q.dtype)
        return sdpa(q, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = block(x)
    assert seen == [torch.float32]
    torch.testing.assert_close(out.float(), block(x), rtol=0.05, atol=0.05)


def test_image_size_validation_message() -> None:
    model = UNet(**TINY)
    assert model.size_multiple == 4
    model.check_image_size(16)
    with pytest.raises(ValueError) as err:
        model.check_image_size(62)
    msg = str(err.value)
    assert msg.startswith("`data.image_size=62` does not fit the U-Net")
    assert "multiples of 4" in msg and "the nearest are 60 or 64" in msg
    assert "\n" not in msg
    with pytest.raises(ValueError, match=r"`data.image_size=0`"):
        model.check_image_size(0)


def test_norm_groups_validation_message() -> None:
    with pytest.raises(ValueError, match=r"`model.net.norm_groups` \(8\).*\[12\] is not"):
        UNet(hidden_dims=[16, 12, 32])


def test_hidden_dims_validation() -> None:
    with pytest.raises(ValueError, match="at least 2 entries"):
        UNet(hidden_dims=[64])
    with pytest.raises(ValueError, match=r"`model.net.hidden_dims='wide'` must be a list"):
        UNet(hidden_dims="wide")  # type: ignore[arg-type]


def test_tiny_gradients_are_finite_everywhere() -> None:
    torch.manual_seed(0)
    model = UNet(**TINY, dropout=0.1, num_classes=3)
    x = torch.randn(2, 3, 16, 16)
    out = model(x, torch.tensor([10, 900]), torch.tensor([0, 3]))
    loss = (out - torch.randn_like(x)).abs().mean()
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
