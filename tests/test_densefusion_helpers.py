"""Shared by the DenseFusion tests: tiny random CLIP and OWLv2 directories (weights, tokenizer, image processor, as a
downloaded checkpoint holds them), a tiny polyfocus captioner, synthworld images and a loopback HTTP server."""

from __future__ import annotations

import http.server
import threading
from contextlib import contextmanager
from pathlib import Path

import torch


def tokenizer_at(path: Path):
    from polyfocus.data.tokenizer import build_tokenizer

    return build_tokenizer(save_dir=path)


WORDS = "a photo of red star blue circle green square cat text dog the . ,".split()


def clip_style_tokenizer(path: Path):
    """A word-level tokenizer laid out as CLIP's: every text wrapped in BOS ... EOS, EOS the highest id (CLIP pools
    the text at the EOS; OWLv2 finds it as the largest id), padding id 0 (OWLv2 masks a query starting with 0)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "<s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    vocab["</s>"] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A </s>",
                                                           special_tokens=[("<s>", 2), ("</s>", vocab["</s>"])])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="<pad>")
    tok.save_pretrained(path)
    return tok


def text_config(tok, max_positions: int) -> dict:
    return dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                max_position_embeddings=max_positions, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)


def tiny_clip(path: Path) -> Path:
    """A random CLIP (32 px images) with a CLIP-style tokenizer."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    tok = clip_style_tokenizer(path)
    config = CLIPConfig(text_config=text_config(tok, 32),
                        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=4, image_size=32, patch_size=16),
                        projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(path)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def tiny_owlv2(path: Path) -> Path:
    """A random OWLv2 (64 px input, 4x4 patches: 16 boxes per image) with a CLIP-style tokenizer."""
    from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessorPil

    tok = clip_style_tokenizer(path)
    config = Owlv2Config(text_config=text_config(tok, 16),
                         vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                            num_attention_heads=4, image_size=64, patch_size=16),
                         projection_dim=32)
    torch.manual_seed(0)
    model = Owlv2ForObjectDetection(config)
    with torch.no_grad():  # a random box head saturates the sigmoid (empty boxes at the border): keep to the
        model.box_head.dense2.weight.mul_(1e-3)  # per-patch prior boxes, jittered, and twice as large as a patch
        model.box_head.dense2.bias.copy_(torch.tensor([0.0, 0.0, 1.0, 1.0]))  # so that neighbours overlap (NMS)
    model.save_pretrained(path)
    Owlv2ImageProcessorPil(size={"height": 64, "width": 64}).save_pretrained(path)
    return path


def tiny_captioner(path: Path, image_size: int = 56) -> Path:
    """A random polyfocus checkpoint that `polyfocus densefusion run --captioner local:DIR` and `polyfocus serve`
    load: a long context (the engine prompt is a few hundred tokens)."""
    from polyfocus import PolyfocusForConditionalGeneration
    from polyfocus.data.images import ImageProcessor
    from polyfocus.model.presets import tiny_config

    tok = tokenizer_at(path)
    torch.manual_seed(0)
    PolyfocusForConditionalGeneration(tiny_config(vocab_size=len(tok), image_size=image_size)).save_pretrained(path)
    ImageProcessor(image_size=image_size).save_pretrained(path)
    return path


def synthworld_data(path: Path, n: int, image_size: int = 112, split: str = "pretrain") -> Path:
    """A synthworld split with dense captions (as `polyfocus demo` exports its pretraining data)."""
    from polyfocus.synthworld.scenes import export

    export(str(path), n, image_size=image_size, families=["dense_caption"], split=split, max_objects=3)
    return path


@contextmanager
def http_server(handler_class):
    """`handler_class` (a BaseHTTPRequestHandler) on a free loopback port, in a thread; yields the base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler_class)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def test_tiny_directories_load(tmp_path):
    """The helpers' directories are what the experts read: AutoModel, AutoTokenizer and the PIL image processors."""
    from transformers import AutoModel, AutoTokenizer

    from polyfocus.experts.base import hf_image_processor

    for build in (tiny_clip, tiny_owlv2):
        path = build(tmp_path / build.__name__)
        assert AutoModel.from_pretrained(path).config.model_type in ("clip", "owlv2")
        tok = AutoTokenizer.from_pretrained(path)
        assert tok("a red cat").input_ids == [2, 3, 6, 12, len(tok) - 1]  # BOS ... EOS, EOS the largest id
        assert "Pil" in type(hf_image_processor(str(path))).__name__  # no torchvision here
