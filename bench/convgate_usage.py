"""How much of MG-LLaVA's high-resolution branch reaches the visual tokens? One JSON line per trained model.

The Conv-Gate (spec mg_llava.md §4) fuses E_F = l + tanh(g) h: l = E_L + f, the low-resolution tokens E_L plus f,
their depthwise 7x7 conv projected back (which mixes each token with its neighbours), h the ConvNeXt's last stage
projected to the tower's width, g one scalar per image. Over synthworld's held-out scenes this reports tanh(g)
(mean, min, max), the hi-res term's share of the fused tokens, |tanh(g)| ||h|| / ||l||, and the conv term's share
of the low-resolution tokens, ||f|| / ||E_L|| (Frobenius norms per image, then the mean over images). At
initialisation both projections are zero, so both shares are 0: a share that stays near 0 after training means
the model does not use that path.

    python bench/convgate_usage.py --data polyfocus_demo/data --split test \
        --model runs/science/runs/mg_llava-hires-seed0/stage2 ...
"""

from __future__ import annotations

import argparse
import json

import torch

from polyfocus.checkpoints import load_model
from polyfocus.infer.pipeline import load_image_processor
from polyfocus.synthworld.scenes import read_scenes, render


@torch.no_grad()
def gate_usage(model, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[n, 3, S, S] images at the model's hi-res size -> (tanh(g), hi-res share, conv share), each [n], read off
    the Conv-Gate's forward."""
    fusion, seen = model.mm_fusion, {}
    hooks = [fusion.gate.register_forward_hook(lambda module, args, out: seen.update(gate=out)),  # [n, 1, 1]
             fusion.slow_proj.register_forward_hook(lambda module, args, out: seen.update(h=out)),  # [n, C, H, W]
             fusion.fast_proj.register_forward_hook(lambda module, args, out: seen.update(f=out)),  # [n, C, H, W]
             fusion.register_forward_hook(lambda module, args, out: seen.update(low=args[0].features, fused=out))]
    try:
        model.image_features(pixel_values)
    finally:
        for hook in hooks:
            hook.remove()
    gate = seen["gate"].tanh().flatten().float()  # [n]
    h = seen["h"].flatten(2).transpose(1, 2).float()  # [n, H*W, C], the fused tokens' layout
    low = seen["fused"].float() - gate[:, None, None] * h  # l
    share = gate.abs() * h.flatten(1).norm(dim=1) / low.flatten(1).norm(dim=1)
    conv_share = seen["f"].float().flatten(1).norm(dim=1) / seen["low"].float().flatten(1).norm(dim=1)
    return gate, share, conv_share


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="+", required=True, help="trained model directories with fusion: convgate")
    p.add_argument("--data", required=True, help="a synthworld export (scenes.jsonl)")
    p.add_argument("--split", default="test")
    p.add_argument("--scenes", type=int, default=100, help="at most this many scenes of the split")
    args = p.parse_args(argv)

    scenes = read_scenes(args.data, args.split)[: args.scenes]
    for model_dir in args.model:
        model = load_model(model_dir).eval()
        if model.config.fusion != "convgate":
            raise SystemExit(f"{model_dir}: fusion is {model.config.fusion!r}, not convgate")
        processor = load_image_processor(model_dir, model.config)
        gate, share, conv_share = (torch.cat(x) for x in zip(*(gate_usage(model, processor([render(scene)]))
                                                                for scene in scenes)))
        print(json.dumps({"bench": "convgate_usage", "model": model_dir, "scenes": len(scenes),
                          "gate_mean": round(gate.mean().item(), 4), "gate_min": round(gate.min().item(), 4),
                          "gate_max": round(gate.max().item(), 4), "share_mean": round(share.mean().item(), 4),
                          "conv_share_mean": round(conv_share.mean().item(), 4)}), flush=True)


if __name__ == "__main__":
    main()
