"""`polyfocus densefusion <verb>`: run (the engine), download, curate, export, synthworld. docs/densefusion.md."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from polyfocus.cli.options import parse_options


def _image_root(args) -> str:
    if args.image_root:
        return args.image_root
    return args.images if os.path.isdir(args.images) else os.path.dirname(os.path.abspath(args.images))


def cmd_run(args: argparse.Namespace) -> None:
    from polyfocus.densefusion.engine import EngineSpec, run_engine
    from polyfocus.densefusion.sources import read_items

    spec = EngineSpec(experts=[e for e in args.experts.split(",") if e], captioner=args.captioner,
                      expert_options=parse_options(args.expert_option, "--expert-option", dotted=True),
                      captioner_options=parse_options(args.captioner_option, "--captioner-option", dotted=False),
                      prompt=args.prompt, shard_size=args.shard_size)
    items = read_items(args.images, alt_text_field=args.alt_text_field, limit=args.limit)
    summary = run_engine(items, _image_root(args), args.out, spec, workers=args.workers, batch_size=args.batch_size,
                         engine=args.engine, ray_address=args.ray_address,
                         ray_gpus_per_worker=args.ray_gpus_per_worker, progress=not args.no_progress)
    print(json.dumps(summary, indent=1))
    print(f"captions: {Path(args.out) / 'captions.jsonl'}  failures: {Path(args.out) / 'failed.jsonl'}")


def cmd_download(args: argparse.Namespace) -> None:
    from polyfocus.densefusion.download import download, read_url_records

    records = read_url_records(args.urls)[: args.limit]
    options = {"retries": args.retries, "timeout": args.timeout, "min_short_edge": args.min_short_edge}
    if args.backend == "native":
        options["backoff"] = args.backoff
    print(json.dumps(download(records, args.out, workers=args.workers, backend=args.backend,
                              progress=not args.no_progress, **options), indent=1))


def cmd_curate(args: argparse.Namespace) -> None:
    from polyfocus.densefusion.curate import curate, load_embeddings
    from polyfocus.densefusion.sources import read_items

    if not (args.model or args.embeddings):
        raise SystemExit("polyfocus densefusion curate: give --model (a local CLIP directory) or --embeddings")
    items = read_items(args.images, limit=args.limit)
    embeddings = load_embeddings(args.embeddings) if args.embeddings else None
    summary = curate(items, _image_root(args), args.out, args.model, args.clusters, eps=args.eps, k=args.top_k,
                     min_short_edge=args.min_short_edge, rank=args.rank, seed=args.seed, embeddings=embeddings,
                     batch_size=args.batch_size, device=args.device)
    print(json.dumps(summary, indent=1))


def cmd_export(args: argparse.Namespace) -> None:
    from polyfocus.densefusion.export import export

    records = Path(args.records)
    records = records / "captions.jsonl" if records.is_dir() else records
    n = export(records, args.out, format=args.format, prompt=args.prompt)
    print(f"{records} -> {args.out} ({args.format}, {n} samples)")


def cmd_synthworld(args: argparse.Namespace) -> None:
    from polyfocus.synthworld.densefusion import synthworld_inputs

    print(json.dumps(synthworld_inputs(args.data, args.out, args.split), indent=1))


def add_parser(verbs) -> None:
    parser = verbs.add_parser("densefusion", help="DenseFusion: the data engine (experts -> captioner), downloads, "
                                                  "curation, export", description=__doc__)
    sub = parser.add_subparsers(dest="densefusion_verb", required=True)

    p = sub.add_parser("run", help="caption images with vision experts + a captioner (resumable, sharded)")
    p.add_argument("--images", required=True,
                   help="an image folder, or a JSONL/JSON list of records (DenseFusion jsonl, a download manifest, "
                        "LLaVA JSON)")
    p.add_argument("--image-root", default=None, help="the records' image paths are relative to this "
                                                      "(default: the list's folder)")
    p.add_argument("--out", required=True, help="run directory; rerun the same command to resume")
    p.add_argument("--experts", default="ocr,alt_text",
                   help="comma-separated, run in this order: ocr, tags, owlv2, synthworld, alt_text")
    p.add_argument("--expert-option", action="append", default=[], metavar="EXPERT.KEY=VALUE",
                   help="e.g. tags.model=./clip tags.vocabulary=tags.txt owlv2.model=./owlv2 ocr.scale=2 (repeat)")
    p.add_argument("--captioner", required=True, help="local:MODEL_DIR | openai:BASE_URL | file:CAPTIONS_FILE")
    p.add_argument("--captioner-option", action="append", default=[], metavar="KEY=VALUE",
                   help="e.g. model=gpt-4o concurrency=16 timeout=120 max_retries=5 max_new_tokens=512 (repeat)")
    p.add_argument("--prompt", choices=["engine", "meta"], default="engine",
                   help="engine: the caption engine's prompt; meta: the GPT-4V prompt of the meta set")
    p.add_argument("--shard-size", type=int, default=256, help="images per output shard (the unit of resumption)")
    p.add_argument("--batch-size", type=int, default=8, help="images per expert / captioner call")
    p.add_argument("--workers", type=int, default=1, help="worker processes (local) or actors (ray)")
    p.add_argument("--engine", choices=["local", "ray"], default="local")
    p.add_argument("--ray-address", default=None, help="an existing Ray cluster (auto, ray://host:10001)")
    p.add_argument("--ray-gpus-per-worker", type=float, default=0)
    p.add_argument("--alt-text-field", default="alt_text", help="the records' field holding the web alt-text")
    p.add_argument("--limit", type=int, default=None, help="only the first N images")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("download", help="fetch images from URL lists: retries, validation, resumable")
    p.add_argument("--urls", required=True, help="JSONL/JSON records with url (DenseFusion-1M.jsonl, LAION), or a "
                                                 ".txt of URLs (URL<TAB>alt-text)")
    p.add_argument("--out", required=True, help="folder: images/, manifest.jsonl, failed.jsonl")
    p.add_argument("--workers", type=int, default=16, help="parallel downloads")
    p.add_argument("--retries", type=int, default=3)
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    p.add_argument("--backoff", type=float, default=1.0, help="first retry wait, seconds; doubles each retry")
    p.add_argument("--min-short-edge", type=int, default=0, help="refuse smaller images (DenseFusion: 448)")
    p.add_argument("--backend", choices=["native", "img2dataset"], default="native")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("curate", help="resolution filter, embeddings, k-means, SemDeDup, top-k per cluster")
    p.add_argument("--images", required=True, help="an image folder or a list of records (as for run)")
    p.add_argument("--image-root", default=None)
    p.add_argument("--out", required=True, help="folder: selected.jsonl, curation.json, embeddings.npz")
    p.add_argument("--model", default=None, help="local CLIP directory for the image embeddings")
    p.add_argument("--embeddings", default=None, help="embeddings.npz of an earlier curate run (no model needed)")
    p.add_argument("--clusters", type=int, required=True, help="k-means clusters (DenseFusion: 50,000 for 500M)")
    p.add_argument("--eps", type=float, default=0.4, help="SemDeDup: duplicates have cosine > 1 - eps")
    p.add_argument("--top-k", type=int, default=20, help="images kept per cluster")
    p.add_argument("--min-short-edge", type=int, default=448)
    p.add_argument("--rank", choices=["centroid", "semdedup"], default="centroid",
                   help="which survivors are the top k: closest to the centroid, or SemDeDup's order")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default=None)
    p.add_argument("--limit", type=int, default=None)
    p.set_defaults(func=cmd_curate)

    p = sub.add_parser("export", help="engine records -> LLaVA JSON (llava) or the caption engine's SFT set")
    p.add_argument("records", help="a run directory (its captions.jsonl) or a DenseFusion jsonl")
    p.add_argument("--out", required=True, help=".json (a list) or .jsonl")
    p.add_argument("--format", choices=["llava", "engine-sft"], default="llava")
    p.add_argument("--prompt", choices=["engine", "meta"], default="engine", help="engine-sft: the prompt")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("synthworld", help="the engine's inputs for a synthworld split: images.jsonl (alt-text = the "
                                          "short caption) and short_captions.json")
    p.add_argument("--data", required=True,
                   help="a synthworld export (scenes.jsonl, images/), e.g. polyfocus_demo/data")
    p.add_argument("--split", default="pretrain")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_synthworld)
