"""MMFuser's forward cost relative to the CLIP-L/336 forward it follows, at real size on the CPU: random weights
from the configs (CLIP-L/336: 24 layers x 1024, 577 tokens; the fuser: blocks 3/8/13/18 -> 23, 16 heads x 4
points), one 336 px image, inference (no grad), fp32, one CPU thread, alternating runs, median of 5. One JSON
line; target: fuser / CLIP <= 0.10.
"""

from __future__ import annotations

import sys

import torch
from common import emit, interleaved
from transformers import CLIPVisionConfig, CLIPVisionModel

from polyfocus.config import CLIP_L_336, PolyfocusConfig
from polyfocus.model.fusion import build_fusion


def main(threads: int = 1):
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    clip = CLIPVisionModel(CLIPVisionConfig(**CLIP_L_336)).eval()
    config = PolyfocusConfig(fusion="mmfuser")  # the default tower is CLIP-L/336, mm_vision_select_layer -2
    fuser = build_fusion(config).eval()
    pixels = torch.randn(1, 3, 336, 336)
    with torch.no_grad():
        hidden_states = clip(pixels, output_hidden_states=True).hidden_states
        features = fuser.fuse(hidden_states)
        assert features.shape == (1, 576, 1024) and torch.equal(features, hidden_states[-2][:, 1:])  # identity at init

        def run_clip():
            clip(pixels, output_hidden_states=True)

        def run_fuser():
            fuser.fuse(hidden_states)

        t_fuser, t_clip = interleaved(run_fuser, run_clip, repeats=5, warmup=1)
    query, kv = config.mmfuser_layers()
    emit({"bench": "mmfuser_cost", "device": "cpu", "threads": threads, "dtype": "float32",
          "query_layer": query, "kv_layers": kv, "fuser_params": sum(p.numel() for p in fuser.parameters()),
          "fuser_s": round(t_fuser, 4), "clip_l_336_s": round(t_clip, 4), "ratio": round(t_fuser / t_clip, 4),
          "target": "<= 0.10"})


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:2]))
