"""`polyfocus <verb>`: one console script, one small function per verb."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def cmd_synth(args: argparse.Namespace) -> None:
    from polyfocus.data.synthworld import export

    families = args.families.split(",") if args.families else None
    summary = export(args.out, args.n, seed=args.seed, image_size=args.image_size, families=families, split=args.split)
    print(json.dumps(summary, indent=2))


def cmd_convert(args: argparse.Namespace) -> None:
    from polyfocus.model.convert import checkpoint_format, copy_processor_files, load_model, save_llava_hf

    found = checkpoint_format(args.src)
    wanted = {"hf": "llava-hf", "llava": ("llava", "projector"), "polyfocus": "polyfocus"}.get(args.from_format)
    if wanted and found not in (wanted if isinstance(wanted, tuple) else (wanted,)):
        raise SystemExit(f"{args.src}: --from {args.from_format} but the directory holds a {found} checkpoint")
    model = load_model(args.src, model_base=args.model_base, vision_tower=args.vision_tower)
    out = Path(args.out)
    if args.to == "hf":
        save_llava_hf(model, out, src_dir=args.src)
    else:
        model.save_pretrained(out)
        copy_processor_files(args.src, out)
    print(f"{args.src} ({found}) -> {out} ({args.to})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="polyfocus", description=__doc__)
    verbs = parser.add_subparsers(dest="verb", required=True)

    p = verbs.add_parser("synth", help="generate a synthworld dataset (LLaVA JSON + images)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--n", type=int, default=1000, help="number of scenes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=384)
    p.add_argument("--split", default="train", choices=["train", "val", "test", "pretrain"],
                   help="pretrain = short captions only, for stage 1")
    p.add_argument("--families", default=None, help="comma-separated task families (default: all)")
    p.set_defaults(func=cmd_synth)

    p = verbs.add_parser("convert", help="convert a checkpoint: llava-hf <-> polyfocus, original LLaVA -> either")
    p.add_argument("src", help="checkpoint directory (polyfocus, llava-hf, or original LLaVA-1.5)")
    p.add_argument("out", help="output directory")
    p.add_argument("--to", choices=["polyfocus", "hf"], default="polyfocus",
                   help="hf = transformers' LlavaForConditionalGeneration layout")
    p.add_argument("--from", dest="from_format", choices=["auto", "hf", "llava", "polyfocus"], default="auto",
                   help="assert the source format (default: detect it)")
    p.add_argument("--model-base", default=None, help="base LLM directory, for a stage-1 mm_projector.bin checkpoint")
    p.add_argument("--vision-tower", default=None, help="local CLIP/SigLIP directory (overrides mm_vision_tower)")
    p.set_defaults(func=cmd_convert)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main(sys.argv[1:])
