"""Deformable attention at MMFuser's real shapes: our sampling core (one embedding_bag over all levels) vs
Deformable-DETR's pure-PyTorch formulation (one grid_sample per level), forward + backward, same process, alternating
runs, median of 11. The outputs and gradients must agree (asserted). One JSON line; target speed-up >= 1.0.

Shapes (spec mmfuser.md §3): batch 1, 576 queries (24 x 24), 4 key/value levels of 24 x 24, width 1024, 16 heads
(64 channels each), 4 points. Locations come from the cross-attention module with perturbed offset weights, so that
samples spread around the reference points (some outside the map) as after training. "module" times the whole
cross-attention (projections included) with either core. One CPU thread (`python bench/deformable_attention.py 2`
for two).
"""

from __future__ import annotations

import sys

import torch

from common import emit, interleaved

from polyfocus.model.fusion import deformable_attention
from polyfocus.model.fusion.deformable_attention import (
    MultiScaleDeformableAttention, centre_grid, deformable_sample, deformable_sample_grid_sample,
)

BATCH, SIDE, LEVELS, DIM, HEADS, POINTS = 1, 24, 4, 1024, 16, 4


def core_inputs(attn, query, memory, shapes):
    """value, locations, weights exactly as the module computes them."""
    N, Lq, _ = query.shape
    with torch.no_grad():
        value = attn.value_proj(memory).view(N, memory.shape[1], HEADS, DIM // HEADS)
        offsets = attn.sampling_offsets(query).view(N, Lq, HEADS, LEVELS, POINTS, 2)
        weights = attn.attention_weights(query).view(N, Lq, HEADS, -1).softmax(-1).view(N, Lq, HEADS, LEVELS, POINTS)
    size = torch.tensor([(w, h) for h, w in shapes], dtype=torch.float32)
    locations = centre_grid(SIDE, SIDE)[:, :, None, :, None, :] + offsets / size[None, None, None, :, None, :]
    return value, locations, weights


def forward_backward(core, inputs, shapes, grad):
    leaves = [t.detach().requires_grad_() for t in inputs]
    out = core(leaves[0], shapes, leaves[1], leaves[2])
    out.backward(grad)
    return out.detach(), [t.grad for t in leaves]


def main(threads: int = 1):
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    shapes = [(SIDE, SIDE)] * LEVELS
    attn = MultiScaleDeformableAttention(DIM, HEADS, LEVELS, POINTS)
    with torch.no_grad():  # a trained-looking module: offsets and weights that depend on the query
        attn.sampling_offsets.weight.normal_(std=0.05)
        attn.attention_weights.weight.normal_(std=0.05)
    query, memory = torch.randn(BATCH, SIDE * SIDE, DIM), torch.randn(BATCH, LEVELS * SIDE * SIDE, DIM)
    inputs = core_inputs(attn, query, memory, shapes)
    grad = torch.randn(BATCH, SIDE * SIDE, DIM)

    ours, ours_grads = forward_backward(deformable_sample, inputs, shapes, grad)
    ref, ref_grads = forward_backward(deformable_sample_grid_sample, inputs, shapes, grad)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)
    for name, a, b in zip(("value", "locations", "weights"), ours_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3, msg=lambda m: f"grad of {name}: {m}")
    outside = ((inputs[1] < 0) | (inputs[1] > 1)).any(-1).float().mean().item()

    t_ours, t_ref = interleaved(lambda: forward_backward(deformable_sample, inputs, shapes, grad),
                                lambda: forward_backward(deformable_sample_grid_sample, inputs, shapes, grad))
    with torch.no_grad():
        f_ours, f_ref = interleaved(lambda: deformable_sample(inputs[0], shapes, inputs[1], inputs[2]),
                                    lambda: deformable_sample_grid_sample(inputs[0], shapes, inputs[1], inputs[2]))

    reference = centre_grid(SIDE, SIDE)

    def module_step(core):
        deformable_attention.deformable_sample = core  # the module looks the core up at call time
        attn.zero_grad(set_to_none=True)
        attn(query, reference, memory, shapes).backward(grad)

    try:
        m_ours, m_ref = interleaved(lambda: module_step(deformable_sample),
                                    lambda: module_step(deformable_sample_grid_sample))
    finally:
        deformable_attention.deformable_sample = deformable_sample

    emit({"bench": "deformable_attention", "device": "cpu", "threads": threads,
          "shapes": {"batch": BATCH, "queries": SIDE * SIDE, "levels": f"{LEVELS}x{SIDE}x{SIDE}", "dim": DIM,
                     "heads": HEADS, "points": POINTS}, "samples_outside_map": round(outside, 3),
          "ours_s": round(t_ours, 4), "grid_sample_s": round(t_ref, 4), "speedup": round(t_ref / t_ours, 2),
          "forward_speedup": round(f_ref / f_ours, 2),
          "module_ours_s": round(m_ours, 4), "module_grid_sample_s": round(m_ref, 4),
          "module_speedup": round(m_ref / m_ours, 2), "same_output": True, "target": ">= 1.0"})


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:2]))
