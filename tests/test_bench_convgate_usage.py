"""bench/convgate_usage.py: the gate and both shares, against the Conv-Gate's formula on the inputs it saw."""


import pytest
import torch
import torch.nn.functional as F

from bench_helpers import load_bench_script
from test_mg_llava import hires_pixels, plain_and_mg, randomise  # noqa: E402


@pytest.fixture
def bench():
    return load_bench_script("convgate_usage")


def test_at_initialisation_no_high_resolution_signal_reaches_the_tokens(bench):
    _, model = plain_and_mg()
    gate, share, conv_share = bench.gate_usage(model, hires_pixels())
    assert share.tolist() == conv_share.tolist() == [0.0, 0.0] and gate.abs().max() < 1


def test_gate_and_share_follow_the_conv_gates_formula(bench):
    _, model = plain_and_mg()
    randomise(model.mm_fusion, scale=0.3)
    seen = {}
    hook = model.mm_fusion.register_forward_hook(
        lambda module, args, out: seen.update(low=args[0].features, high=args[0].hires_stages[-1]))
    gate, share, conv_share = bench.gate_usage(model, hires_pixels())
    hook.remove()
    fusion, low, high = model.mm_fusion, seen["low"], seen["high"]
    n, tokens, width = low.shape
    side = int(tokens ** 0.5)
    with torch.no_grad():  # spec mg_llava.md §4, written out
        h = fusion.slow_proj(F.gelu(fusion.slow_conv(high))).flatten(2).transpose(1, 2)
        grid = low.transpose(1, 2).reshape(n, width, side, side)
        f = fusion.fast_proj(F.gelu(fusion.fast_conv(grid)))
        l = (grid + f).flatten(2).transpose(1, 2)
        g = torch.tanh(fusion.gate(torch.cat([l, h], -1).mean(1))).flatten()
    torch.testing.assert_close(gate, g)
    torch.testing.assert_close(share, g.abs() * h.flatten(1).norm(dim=1) / l.flatten(1).norm(dim=1))
    torch.testing.assert_close(conv_share, f.flatten(1).norm(dim=1) / low.flatten(1).norm(dim=1))
    assert (share > 0).all() and (conv_share > 0).all()
