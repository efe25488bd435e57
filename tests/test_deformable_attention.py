"""Multi-scale deformable attention (polyfocus/model/fusion/deformable_attention.py) against the spec's exact sampling
rule (spec mmfuser.md §6), written here as a naive per-point loop, and Deformable-DETR's parameterisation (§5).

Levels are non-square (3x5, 4x2, ...) so that an x/y or H/W mix-up cannot pass.
"""

import math

import pytest
import torch

from polyfocus.model.fusion.deformable_attention import (
    MultiScaleDeformableAttention, centre_grid, deformable_sample, deformable_sample_grid_sample,
)

SHAPES = [(3, 5), (4, 2), (6, 4), (3, 2)]  # (H, W) per level, all non-square


def naive_sample(value, shapes, locations, weights):
    """Steps 1-5 of spec §6, one sample at a time (the CUDA kernel's rule)."""
    N, S, M, D = value.shape
    _, Lq, _, L, P, _ = locations.shape
    starts = [sum(h * w for h, w in shapes[:level]) for level in range(L)]
    out = torch.zeros(N, Lq, M, D, dtype=value.dtype)
    for n in range(N):
        for q in range(Lq):
            for m in range(M):
                for level, (H, W) in enumerate(shapes):
                    for p in range(P):
                        x, y = locations[n, q, m, level, p].tolist()
                        h, w = y * H - 0.5, x * W - 0.5  # 1. pixel coordinates, centres at i + 0.5
                        if not (-1 < h < H and -1 < w < W):  # 2. outside: 0
                            continue
                        h0, w0 = math.floor(h), math.floor(w)  # 3.
                        lh, lw = h - h0, w - w0
                        sample = torch.zeros(D, dtype=value.dtype)
                        for hc, wh in ((h0, 1 - lh), (h0 + 1, lh)):  # 4. four corners, outside ones read 0
                            for wc, ww in ((w0, 1 - lw), (w0 + 1, lw)):
                                if 0 <= hc < H and 0 <= wc < W:
                                    sample += wh * ww * value[n, starts[level] + hc * W + wc, m]
                        out[n, q, m] += weights[n, q, m, level, p] * sample  # 5.
    return out.reshape(N, Lq, M * D)


def random_inputs(shapes, N=2, M=3, D=4, Lq=5, P=3, dtype=torch.float64, low=-0.15, high=1.15, seed=0):
    """Locations partly outside [0, 1], to cover zero padding at every edge."""
    g = torch.Generator().manual_seed(seed)
    S, L = sum(h * w for h, w in shapes), len(shapes)
    value = torch.randn(N, S, M, D, generator=g, dtype=dtype)
    locations = low + (high - low) * torch.rand(N, Lq, M, L, P, 2, generator=g, dtype=dtype)
    weights = torch.rand(N, Lq, M, L, P, generator=g, dtype=dtype) + 1e-5
    return value, locations, weights / weights.sum((-1, -2), keepdim=True)


@pytest.mark.parametrize("core", [deformable_sample, deformable_sample_grid_sample])
def test_core_equals_the_naive_loop_in_float64(core):
    value, locations, weights = random_inputs(SHAPES)
    torch.testing.assert_close(core(value, SHAPES, locations, weights), naive_sample(value, SHAPES, locations, weights),
                               rtol=0, atol=1e-12)


def test_reference_unit_test_configuration():
    """Deformable-DETR's models/ops/test.py: N=1, M=2, D=2, Lq=2, L=2, P=2, shapes (6,4),(3,2), values rand*0.01."""
    shapes = [(6, 4), (3, 2)]
    g = torch.Generator().manual_seed(3)
    value = torch.rand(1, 30, 2, 2, generator=g, dtype=torch.float64) * 0.01
    locations = torch.rand(1, 2, 2, 2, 2, 2, generator=g, dtype=torch.float64)
    weights = torch.rand(1, 2, 2, 2, 2, generator=g, dtype=torch.float64) + 1e-5
    weights = weights / weights.sum((-1, -2), keepdim=True)
    want = naive_sample(value, shapes, locations, weights)
    torch.testing.assert_close(deformable_sample(value, shapes, locations, weights), want, rtol=0, atol=1e-12)
    got32 = deformable_sample(value.float(), shapes, locations.float(), weights.float())
    torch.testing.assert_close(got32.double(), want, rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("channels", [30, 32, 64, 71])
def test_gradcheck(channels):
    shapes = [(3, 5), (4, 2)]
    value, locations, weights = random_inputs(shapes, N=1, M=2, D=channels, Lq=2, P=2, low=0.02, high=0.98)
    inputs = tuple(t.requires_grad_() for t in (value, locations, weights))
    assert torch.autograd.gradcheck(lambda v, loc, w: deformable_sample(v, shapes, loc, w), inputs)


def test_gradcheck_wide_channels_fast_mode():
    shapes = [(3, 5), (4, 2)]
    value, locations, weights = random_inputs(shapes, N=1, M=1, D=1025, Lq=2, P=2, low=0.02, high=0.98)
    inputs = tuple(t.requires_grad_() for t in (value, locations, weights))
    assert torch.autograd.gradcheck(lambda v, loc, w: deformable_sample(v, shapes, loc, w), inputs, fast_mode=True)


def test_gradients_equal_the_grid_sample_formulation():
    value, locations, weights = random_inputs(SHAPES, low=0.02, high=0.98)
    grads = []
    for core in (deformable_sample, deformable_sample_grid_sample):
        inputs = [t.clone().requires_grad_() for t in (value, locations, weights)]
        core(inputs[0], SHAPES, inputs[1], inputs[2]).pow(2).sum().backward()
        grads.append([t.grad for t in inputs])
    for ours, reference in zip(*grads):
        torch.testing.assert_close(ours, reference, rtol=1e-9, atol=1e-10)


# ---- invariants (spec §6) ----------------------------------------------------------------------------------------


def one_point(x, y, L=1):
    """locations / weights of a single sample at (x, y) on level 0 (weight 1), others weightless."""
    locations = torch.zeros(1, 1, 1, L, 1, 2, dtype=torch.float64)
    locations[..., 0, :, :] = torch.tensor([x, y], dtype=torch.float64)
    weights = torch.zeros(1, 1, 1, L, 1, dtype=torch.float64)
    weights[..., 0, :] = 1
    return locations, weights


def test_pixel_centre_returns_that_pixel_and_the_order_is_row_major():
    H, W = 3, 5
    value = torch.randn(1, H * W, 1, 2, dtype=torch.float64)
    for r in range(H):
        for c in range(W):
            locations, weights = one_point((c + 0.5) / W, (r + 0.5) / H)
            out = deformable_sample(value, [(H, W)], locations, weights)
            assert torch.equal(out[0, 0], value[0, r * W + c, 0])  # token r*W + c is pixel (row r, column c)


def test_constant_field_is_returned_inside_the_map():
    shapes = [(3, 5), (4, 2)]
    value = torch.full((2, 23, 2, 3), 0.7, dtype=torch.float64)
    _, locations, weights = random_inputs(shapes, N=2, M=2, D=3)
    # every sample within [0.5/size, 1 - 0.5/size] of its own level: all four corners inside
    for level, (h, w) in enumerate(shapes):
        locations[..., level, :, 0] = 0.5 / w + locations[..., level, :, 0].clamp(0, 1) * (1 - 1 / w)
        locations[..., level, :, 1] = 0.5 / h + locations[..., level, :, 1].clamp(0, 1) * (1 - 1 / h)
    torch.testing.assert_close(deformable_sample(value, shapes, locations, weights),
                               torch.full((2, 5, 6), 0.7, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("x,y", [(-0.3, 0.5), (1.3, 0.5), (0.5, -0.4), (0.5, 1.5), (2.0, 2.0)])
def test_fully_outside_is_zero(x, y):
    value = torch.randn(1, 15, 1, 2, dtype=torch.float64)
    locations, weights = one_point(x, y)
    out = deformable_sample(value, [(3, 5)], locations, weights)
    assert torch.equal(out, torch.zeros(1, 1, 2, dtype=torch.float64))


def test_a_nan_location_gives_nan_not_an_index_error():
    value = torch.randn(1, 15, 1, 2, dtype=torch.float64)
    locations, weights = one_point(float("nan"), 0.5)
    assert deformable_sample(value, [(3, 5)], locations, weights).isnan().all()


def test_swapping_height_and_width_changes_the_result():
    value, locations, weights = random_inputs([(3, 5)], N=1, M=2, D=3)
    assert not torch.allclose(deformable_sample(value, [(3, 5)], locations, weights),
                              deformable_sample(value, [(5, 3)], locations, weights))


def test_token_count_must_match_the_shapes():
    value, locations, weights = random_inputs([(3, 5)])
    with pytest.raises(ValueError, match="15 tokens but the level shapes"):
        deformable_sample(value, [(4, 4)], locations, weights)


# ---- the module (spec §5) ----------------------------------------------------------------------------------------


def test_centre_grid():
    grid = centre_grid(24, 24)
    assert grid.shape == (1, 576, 1, 2)
    assert torch.equal(grid[0, 1, 0], torch.tensor([1.5 / 24, 0.5 / 24]))  # (x, y): x varies fastest
    grid = centre_grid(3, 5)
    assert grid[0, 5, 0].tolist() == pytest.approx([0.5 / 5, 1.5 / 3])  # token 5: row 1, column 0


def test_init_is_deformable_detrs():
    attn = MultiScaleDeformableAttention(64, num_heads=16, num_levels=4, num_points=4)
    bias = attn.sampling_offsets.bias.view(16, 4, 4, 2)  # [M, L, P, (dx, dy)]
    assert torch.equal(attn.sampling_offsets.weight, torch.zeros_like(attn.sampling_offsets.weight))
    assert bias[0, :, :, 0].tolist() == [[1, 2, 3, 4]] * 4 and bias[0, :, :, 1].abs().max() < 1e-6  # head 0: +x
    assert torch.allclose(bias[2], torch.tensor([[[1.0, 1], [2, 2], [3, 3], [4, 4]]] * 4))  # head 2: 45 degrees
    assert torch.allclose(bias[4, 0, 0], torch.tensor([0.0, 1.0]), atol=1e-6)  # head 4: +y (90 degrees)
    assert torch.allclose(bias.abs().amax(-1), torch.arange(1.0, 5).expand(16, 4, 4))  # on the L-inf square
    for linear in (attn.attention_weights,):  # uniform attention at init
        assert not linear.weight.any() and not linear.bias.any()
    for linear in (attn.value_proj, attn.output_proj):
        bound = math.sqrt(6 / (64 + 64))  # xavier_uniform
        assert linear.weight.abs().max() <= bound and linear.weight.std() > bound / 3 and not linear.bias.any()


def test_module_equals_the_formula_with_the_reference_core():
    """Offsets in pixels of their level, normalised by (W, H); one softmax over all L*P samples of a head."""
    torch.manual_seed(0)
    attn = MultiScaleDeformableAttention(8, num_heads=2, num_levels=2, num_points=3).double()
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.3)
    shapes = [(3, 5), (4, 2)]
    query, memory = torch.randn(2, 4, 8, dtype=torch.float64), torch.randn(2, 23, 8, dtype=torch.float64)
    reference = torch.rand(1, 4, 1, 2, dtype=torch.float64)
    offsets = attn.sampling_offsets(query).view(2, 4, 2, 2, 3, 2)
    weights = attn.attention_weights(query).view(2, 4, 2, 6).softmax(-1).view(2, 4, 2, 2, 3)
    size = torch.tensor([[5.0, 3.0], [2.0, 4.0]], dtype=torch.float64)  # (W, H) per level
    locations = reference[:, :, None, :, None, :] + offsets / size[None, None, None, :, None, :]
    value = attn.value_proj(memory).view(2, 23, 2, 4)
    want = attn.output_proj(naive_sample(value, shapes, locations, weights))
    torch.testing.assert_close(attn(query, reference, memory, shapes), want, rtol=0, atol=1e-12)


def test_bf16_module_runs_on_cpu_and_samples_in_fp32():
    torch.manual_seed(0)
    attn = MultiScaleDeformableAttention(32, num_heads=4, num_levels=2, num_points=4)
    shapes = [(3, 5), (4, 2)]
    query, memory = torch.randn(2, 15, 32), torch.randn(2, 23, 32)
    reference = centre_grid(3, 5)
    want = attn(query, reference, memory, shapes)
    got = attn.to(torch.bfloat16)(query.bfloat16(), reference, memory.bfloat16(), shapes)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=0.05, atol=0.05)
    got.float().sum().backward()
    assert attn.value_proj.weight.grad.dtype == torch.bfloat16 and attn.value_proj.weight.grad.abs().sum() > 0
