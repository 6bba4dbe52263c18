"""DSA: shapes, gradients, replay, semantics against the original formulas, strategy handling."""
import math
from dataclasses import fields, replace

import pytest
import torch
import torch.nn.functional as F

from mtt.augment import (
    DEFAULT_STRATEGY,
    DSA,
    OPS,
    DSAParams,
    apply_params,
    sample_params,
)

CHANNELS = (1, 3)
SIZES = (8, 32)
B = 6


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(c: int, size: int, dtype=torch.float32, b: int = B, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, c, size, size, generator=gen(seed)).to(dtype)


def draw(op: str, x: torch.Tensor, seed: int = 1) -> DSAParams:
    b, c, h, w = x.shape
    return sample_params(op, b, c, (h, w), gen(seed))


def params_equal(p: DSAParams, q: DSAParams) -> bool:
    for f in fields(DSAParams):
        a, b = getattr(p, f.name), getattr(q, f.name)
        if isinstance(a, torch.Tensor) != isinstance(b, torch.Tensor):
            return False
        if isinstance(a, torch.Tensor) and not torch.equal(a, b):
            return False
        if not isinstance(a, torch.Tensor) and a != b:
            return False
    return True


every_op_image = pytest.mark.parametrize(
    "op,c,size", [(op, c, s) for op in OPS for c in CHANNELS for s in SIZES]
)


# --- generic properties, every op ----------------------------------------------------


@every_op_image
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_keeps_shape_and_dtype(op, c, size, dtype):
    x = images(c, size, dtype)
    out = apply_params(x, draw(op, x))
    assert out.shape == x.shape and out.dtype == dtype
    assert torch.isfinite(out).all()


@every_op_image
def test_gradients_reach_input(op, c, size):
    x = images(c, size).requires_grad_()
    weights = torch.randn(x.shape, generator=gen(7))
    (apply_params(x, draw(op, x)) * weights).sum().backward()
    assert torch.isfinite(x.grad).all()
    assert x.grad.abs().sum() > 0


@every_op_image
def test_replay_is_bit_identical(op, c, size):
    x = images(c, size)
    out, params = DSA(op).augment(x, gen(3))
    assert torch.equal(apply_params(x, params), out)
    assert torch.equal(apply_params(x, params), apply_params(x, params))
    # Same seed: same draw and output; different seed: different output.
    out2, params2 = DSA(op).augment(x, gen(3))
    assert params_equal(params, params2) and torch.equal(out, out2)
    out3, _ = DSA(op).augment(x, gen(4))
    assert not torch.equal(out, out3)


@pytest.mark.parametrize("op", OPS)
def test_gradcheck_float64(op):
    x = images(3, 8, torch.float64, b=2).requires_grad_()
    params = draw(op, x)
    assert torch.autograd.gradcheck(lambda t: apply_params(t, params), (x,))


@pytest.mark.parametrize("op", OPS)
def test_vmap_over_experts_matches_loop(op):
    # A later stage vmaps the student over experts; apply_params must trace under vmap.
    xs = torch.randn(3, B, 3, 8, 8, generator=gen(5))
    params = draw(op, xs[0])
    batched = torch.func.vmap(lambda x: apply_params(x, params))(xs)
    looped = torch.stack([apply_params(x, params) for x in xs])
    torch.testing.assert_close(batched, looped)


# --- semantics of each op -------------------------------------------------------------


def with_tensor(op: str, x: torch.Tensor, **tensors) -> DSAParams:
    b, c, h, w = x.shape
    return DSAParams(op, b, c, (h, w), **tensors)


def affine(theta_2x3, b: int) -> torch.Tensor:
    return torch.tensor(theta_2x3, dtype=torch.float32).expand(b, 2, 3).clone()


@pytest.mark.parametrize("c", CHANNELS)
@pytest.mark.parametrize("size", SIZES)
def test_flip_mirrors_width_where_masked(c, size):
    x = images(c, size)
    all_flip = with_tensor("flip", x, flip=torch.ones(B, dtype=torch.bool))
    assert torch.equal(apply_params(x, all_flip), torch.flip(x, [3]))
    mask = torch.tensor([True, False] * (B // 2))
    out = apply_params(x, with_tensor("flip", x, flip=mask))
    assert torch.equal(out[mask], x[mask].flip(3)) and torch.equal(out[~mask], x[~mask])


def reference_crop(x, translation):
    """The original rand_crop: pad one zero pixel, shift by the translation, clamp into the pad."""
    b, _, h, w = x.shape
    gb, gx, gy = torch.meshgrid(torch.arange(b), torch.arange(h), torch.arange(w), indexing="ij")
    gx = torch.clamp(gx + translation[:, 0].view(-1, 1, 1) + 1, 0, h + 1)
    gy = torch.clamp(gy + translation[:, 1].view(-1, 1, 1) + 1, 0, w + 1)
    return F.pad(x, [1, 1, 1, 1]).permute(0, 2, 3, 1)[gb, gx, gy].permute(0, 3, 1, 2)


@pytest.mark.parametrize("c", CHANNELS)
@pytest.mark.parametrize("size", SIZES)
def test_crop_is_translation_with_zero_fill(c, size):
    x = images(c, size)
    zero = with_tensor("crop", x, translation=torch.zeros(B, 2, dtype=torch.long))
    assert torch.equal(apply_params(x, zero), x)
    for seed in range(5):
        params = draw("crop", x, seed)
        assert torch.equal(apply_params(x, params), reference_crop(x, params.translation))
    # Row shift +1: content moves up one row (out[i] = x[i + 1]), the last row is zero-filled.
    up = apply_params(x, with_tensor("crop", x, translation=torch.tensor([[1, 0]] * B)))
    assert torch.equal(up[:, :, :-1], x[:, :, 1:]) and (up[:, :, -1] == 0).all()
    # Column shift -1: content moves right one column.
    right = apply_params(x, with_tensor("crop", x, translation=torch.tensor([[0, -1]] * B)))
    assert torch.equal(right[..., 1:], x[..., :-1]) and (right[..., 0] == 0).all()


def reference_cutout(x, offset):
    """The original rand_cutout: zero a half-size square around `offset`, indices clamped."""
    b, _, h, w = x.shape
    ch, cw = int(h * 0.5 + 0.5), int(w * 0.5 + 0.5)
    gb, gx, gy = torch.meshgrid(torch.arange(b), torch.arange(ch), torch.arange(cw), indexing="ij")
    gx = torch.clamp(gx + offset[:, 0].view(-1, 1, 1) - ch // 2, 0, h - 1)
    gy = torch.clamp(gy + offset[:, 1].view(-1, 1, 1) - cw // 2, 0, w - 1)
    mask = torch.ones(b, h, w, dtype=x.dtype)
    mask[gb, gx, gy] = 0
    return x * mask.unsqueeze(1)


@pytest.mark.parametrize("c", CHANNELS)
@pytest.mark.parametrize("size", SIZES)
def test_cutout_zeroes_a_half_size_square(c, size):
    x = images(c, size)
    for seed in range(5):
        params = draw("cutout", x, seed)
        assert torch.equal(apply_params(x, params), reference_cutout(x, params.offset))
    # Centred hole: exactly (size/2)^2 zeros per channel, at the expected place.
    centre = with_tensor("cutout", x, offset=torch.full((B, 2), size // 2))
    out = apply_params(x, centre)
    lo, hi = size // 4, size // 4 + size // 2
    assert (out[:, :, lo:hi, lo:hi] == 0).all()
    assert ((out == 0).sum(dim=(2, 3)) == (size // 2) ** 2).all()
    # Hole at the corner is clipped to the image.
    corner = apply_params(x, with_tensor("cutout", x, offset=torch.zeros(B, 2, dtype=torch.long)))
    assert ((corner == 0).sum(dim=(2, 3)) == (size // 2 - size // 4) ** 2).all()


@pytest.mark.parametrize("op", ["scale", "rotate"])
@pytest.mark.parametrize("c", CHANNELS)
@pytest.mark.parametrize("size", SIZES)
def test_affine_identity_mirror_and_quarter_turn(op, c, size):
    x = images(c, size, torch.float64)
    params = draw(op, x)  # the original: affine_grid + bilinear grid_sample, align_corners=True
    grid = F.affine_grid(params.theta.double(), list(x.shape), align_corners=True)
    torch.testing.assert_close(apply_params(x, params), F.grid_sample(x, grid, align_corners=True))
    identity = with_tensor(op, x, theta=affine([[1, 0, 0], [0, 1, 0]], B))
    torch.testing.assert_close(apply_params(x, identity), x)
    mirror = with_tensor(op, x, theta=affine([[-1, 0, 0], [0, 1, 0]], B))
    torch.testing.assert_close(apply_params(x, mirror), x.flip(3))
    # Angle +90 degrees in the original's convention is an anticlockwise quarter turn.
    quarter = with_tensor(op, x, theta=affine([[0, -1, 0], [1, 0, 0]], B))
    torch.testing.assert_close(apply_params(x, quarter), torch.rot90(x, 1, (2, 3)))


def test_scale_zoom_out_leaves_zero_border():
    x = torch.ones(1, 1, 32, 32)
    zoom_out = with_tensor("scale", x, theta=affine([[1.2, 0, 0], [0, 1.2, 0]], 1))
    out = apply_params(x, zoom_out)
    # Sampling 1.2x further out than the image reaches the zero padding near the border.
    assert (out[..., 0, :] == 0).all() and torch.allclose(out[..., 8:24, 8:24], torch.ones(16, 16))


@pytest.mark.parametrize("c", CHANNELS)
@pytest.mark.parametrize("size", SIZES)
def test_color_matches_original_formulas(c, size):
    x = images(c, size, torch.float64)
    params = draw("color", x)
    b, s, k = (t.double().view(-1, 1, 1, 1) for t in (params.brightness, params.saturation, params.contrast))
    y = x + (b - 0.5) * 1.0
    y = (y - y.mean(1, keepdim=True)) * (s * 2.0) + y.mean(1, keepdim=True)
    y = (y - y.mean((1, 2, 3), keepdim=True)) * (k + 0.5) + y.mean((1, 2, 3), keepdim=True)
    torch.testing.assert_close(apply_params(x, params), y)
    half = torch.full((B,), 0.5)
    neutral = with_tensor("color", x, brightness=half, saturation=half, contrast=half)
    torch.testing.assert_close(apply_params(x, neutral), x)
    assert not torch.allclose(apply_params(x, params), x)


def test_sampled_ranges_match_the_original():
    n, size = 4096, 32

    def many(op):
        return sample_params(op, n, 3, (size, size), gen(11))

    sx, sy = many("scale").theta[:, 0, 0], many("scale").theta[:, 1, 1]
    for s in (sx, sy):
        assert s.min() >= 1 / 1.2 and s.max() <= 1.2 and s.max() - s.min() > 0.3
    theta = many("rotate").theta
    angle = torch.atan2(theta[:, 1, 0], theta[:, 0, 0]) * 180 / math.pi
    assert angle.abs().max() <= 15 + 1e-4 and angle.abs().max() > 14
    torch.testing.assert_close(theta[:, 0, 1], -theta[:, 1, 0])
    t = many("crop").translation
    assert set(t.flatten().tolist()) == set(range(-4, 5))  # int(32 * 0.125 + 0.5) = 4
    o = many("cutout").offset
    assert o.min() == 0 and o.max() == size  # even hole size: centre in [0, size]
    assert abs(many("flip").flip.float().mean() - 0.5) < 0.05
    color = many("color")
    for t in (color.brightness, color.saturation, color.contrast):
        assert t.min() >= 0 and t.max() < 1


# --- strategy, DSA class, errors, devices ---------------------------------------------


def test_strategy_picks_one_op_per_call_and_all_over_calls():
    needs = {"color": {"brightness", "saturation", "contrast"}, "crop": {"translation"},
             "cutout": {"offset"}, "flip": {"flip"}, "scale": {"theta"}, "rotate": {"theta"}}
    g, chosen = gen(0), []
    for _ in range(200):
        p = sample_params(DEFAULT_STRATEGY, 2, 3, (8, 8), g)
        drawn = {f.name for f in fields(p) if isinstance(getattr(p, f.name), torch.Tensor)}
        assert drawn == needs[p.op]  # exactly one op's parameters per call
        chosen.append(p.op)
    assert set(chosen) == set(OPS)
    assert max(map(chosen.count, OPS)) < 3 * min(map(chosen.count, OPS))  # roughly uniform
    g = gen(1)
    assert {sample_params("flip_crop", 2, 3, (8, 8), g).op for _ in range(50)} == {"flip", "crop"}


def test_dsa_call_and_none_strategy():
    x = images(3, 8)
    dsa = DSA()
    assert dsa.strategy == DEFAULT_STRATEGY
    assert torch.equal(dsa(x, gen(2)), dsa.augment(x, gen(2))[0])
    for strategy in ("none", "None", ""):
        out, params = DSA(strategy).augment(x, gen(0))
        assert out is x and params.op == "none"
        assert apply_params(x, params) is x


def test_unknown_op_is_a_clear_error():
    with pytest.raises(ValueError, match="valid ops: color, crop, cutout, flip, scale, rotate"):
        DSA("color_blur")
    with pytest.raises(ValueError, match="blur"):
        sample_params("blur", 2, 3, (8, 8), gen(0))


def test_wrong_batch_for_params_is_a_clear_error():
    x = images(3, 8)
    params = draw("flip", x)
    with pytest.raises(ValueError, match=r"shape \[6, 3, 8, 8\].*\[5, 3, 8, 8\]"):
        apply_params(x[:5], params)
    with pytest.raises(ValueError, match="shape"):
        apply_params(images(1, 8), params)


def test_params_to_device_keeps_values():
    x = images(3, 8)
    params = draw("color", x)
    moved = params.to("cpu")
    assert params_equal(params, moved)
    assert torch.equal(apply_params(x, moved), apply_params(x, params))
    assert sample_params("crop", 2, 3, (8, 8), gen(0), device="cpu").translation.device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("op", OPS)
def test_cuda_matches_cpu_and_replays(op):
    x = images(3, 32)
    params = draw(op, x)  # drawn with a CPU generator: same draw for every device
    cuda_params, xc = params.to("cuda"), x.cuda()
    out = apply_params(xc, cuda_params)
    assert torch.equal(out, apply_params(xc, cuda_params))
    torch.testing.assert_close(out.cpu(), apply_params(x, params), atol=1e-5, rtol=1e-5)
    x64 = xc.double().requires_grad_()
    apply_params(x64, cuda_params).sum().backward()
    assert torch.isfinite(x64.grad).all() and x64.grad.abs().sum() > 0


@pytest.mark.parametrize("op", OPS)
def test_vmap_with_per_expert_params(op):
    # Experts may share the op but draw their own tensors; apply_params must vmap over both.
    xs = torch.randn(3, B, 3, 8, 8, generator=gen(5))
    drawn = [draw(op, xs[0], seed) for seed in range(3)]
    names = [f.name for f in fields(DSAParams) if isinstance(getattr(drawn[0], f.name), torch.Tensor)]
    stacked = {n: torch.stack([getattr(p, n) for p in drawn]) for n in names}
    batched = torch.func.vmap(lambda x, t: apply_params(x, replace(drawn[0], **t)))(xs, stacked)
    looped = torch.stack([apply_params(x, p) for x, p in zip(xs, drawn)])
    torch.testing.assert_close(batched, looped)
