"""MMFuser (polyfocus/model/fusion/mmfuser.py; spec mmfuser.md): the block, its config switch, the model it joins
(identical to the plain model at init), checkpoints (ours and the reference repo's layout), and training.

The deformable attention itself is tested in tests/test_deformable_attention.py.
"""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_checkpoints import (
    llava_config,
    write_base_llm,
    write_clip_tower,
    write_shards,
)
from train_helpers import changed, train_recording, write_tiny_backbones

from polyfocus import PolyfocusConfig, PolyfocusForConditionalGeneration
from polyfocus.checkpoints import checkpoint_format, load_model, to_llava_hf
from polyfocus.model.fusion import MMFuser
from polyfocus.model.fusion.deformable_attention import centre_grid
from polyfocus.model.presets import tiny_config

REPO = Path(__file__).resolve().parents[1]
IMG = 4


def fused_config(vision_layers=3, **overrides):
    """tiny_config with fusion on; `vision_layers` deep tower (the reference layout needs 5 distinct layers)."""
    config = tiny_config(**{k: v for k, v in overrides.items() if k in ("vision", "vision_hidden_size", "image_size")})
    fields = {**config.to_dict(), "fusion": "mmfuser",
              **{k: v for k, v in overrides.items() if k not in ("vision", "vision_hidden_size", "image_size")}}
    fields["vision_config"] = {**config.vision_config.to_dict(), "num_hidden_layers": vision_layers}
    return PolyfocusConfig(**fields)


def plain_and_fused(**overrides):
    """A plain model and the same model with MMFuser switched on: identical tower, projector and LLM weights."""
    fused_cfg = fused_config(**overrides)
    plain_cfg = PolyfocusConfig(**{**fused_cfg.to_dict(), "fusion": None, "mmfuser_kv_layers": None,
                                   "mmfuser_num_heads": 16, "mmfuser_num_points": 4})
    torch.manual_seed(0)
    plain = PolyfocusForConditionalGeneration(plain_cfg).eval()
    fused = PolyfocusForConditionalGeneration(fused_cfg).eval()
    result = fused.load_state_dict(plain.state_dict(), strict=False)
    assert not result.unexpected_keys and all(k.startswith("mm_fusion.") for k in result.missing_keys)
    return plain, fused


def batch(config, n_images=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    n = config.num_image_tokens
    ids = torch.tensor([[1, 9, *[IMG] * n, 7, 8]] * n_images)
    size = config.vision_config.image_size
    return ids, torch.randn(n_images, 3, size, size, generator=g)


def randomise(module, seed=3):
    """Non-zero gammas and perturbed weights: a fuser that actually changes its input."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))


# ---- 1. the block ------------------------------------------------------------------------------------------------


def clip_l_states(batch_size=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch_size, 577, 1024, generator=g) for _ in range(25))


def test_real_size_parameter_count_shapes_and_identity_at_init():
    """CLIP-L/336: query block 23, key/values 3/8/13/18, 16 heads, 4 points (spec §3: 5,190,592 parameters)."""
    torch.manual_seed(0)
    fuser = MMFuser(1024, (24, 24), 23, [3, 8, 13, 18], num_heads=16, num_points=4)
    assert sum(p.numel() for p in fuser.parameters()) == 5_190_592
    counts = {name: sum(p.numel() for p in getattr(fuser, name).parameters()) for name in ("cross_attn", "self_attn")}
    assert counts == {"cross_attn": 2_886_400, "self_attn": 2_296_000}
    states = clip_l_states()
    with torch.no_grad():
        out = fuser.fuse(states)
    assert out.shape == (1, 576, 1024)
    assert torch.equal(out, states[23][:, 1:])  # bit-identical to LLaVA-1.5's feature (CLS dropped)


def test_only_gamma1_has_a_gradient_at_the_first_step():
    torch.manual_seed(0)
    fuser = MMFuser(32, (4, 4), 3, [0, 1, 2], num_heads=4, num_points=2)
    states = tuple(torch.randn(2, 17, 32) for _ in range(4))
    grad_out = torch.randn(2, 16, 32)
    (fuser.fuse(states) * grad_out).sum().backward()
    grads = {n: p.grad for n, p in fuser.named_parameters()}
    assert grads.pop("gamma1").abs().sum() > 0
    assert all(g is not None and not g.any() for g in grads.values()), [n for n, g in grads.items() if g.any()]


def test_adam_steps_wake_the_branches_one_after_another():
    """Spec §3: step 1 moves gamma1 only; step 2 the cross-attention and gamma2; step 3 everything."""
    torch.manual_seed(0)
    fuser = MMFuser(32, (4, 4), 3, [0, 1, 2], num_heads=4, num_points=2)
    states = tuple(torch.randn(2, 17, 32) for _ in range(4))
    target = torch.randn(2, 16, 32)
    optimizer = torch.optim.AdamW(fuser.parameters(), lr=1e-2, weight_decay=0.0)
    before = {n: p.detach().clone() for n, p in fuser.named_parameters()}
    moved = []
    for _ in range(3):
        optimizer.zero_grad()
        (fuser.fuse(states) - target).pow(2).mean().backward()
        optimizer.step()
        moved.append({n for n, p in fuser.named_parameters() if not torch.equal(p, before[n])})
    assert moved[0] == {"gamma1"}
    assert {"gamma2", "feat_norm.weight", "feat_norm.bias", "cross_attn.sampling_offsets.weight",
            "cross_attn.attention_weights.weight", "cross_attn.value_proj.weight"} <= moved[1]
    # the query reaches the output only through the offset and weight projections, zero until step 2 moved them
    assert not any(n.startswith(("self_attn.", "norm1.", "query_norm.")) for n in moved[1])
    assert moved[2] == set(before)


def test_forward_is_the_papers_sum_of_attentions():
    """out = q + gamma1 * (ca + gamma2 * sa): cross-attention from LN(q) into LN(kv levels), self-attention over
    LN(ca), the residual onto the raw query; key/value levels in the listed order, CLS dropped."""
    torch.manual_seed(0)
    fuser = MMFuser(32, (3, 3), 3, [0, 2], num_heads=4, num_points=2).double()
    randomise(fuser)
    states = tuple(torch.randn(2, 10, 32, dtype=torch.float64) for _ in range(4))
    q = states[3][:, 1:]
    reference = centre_grid(3, 3, dtype=torch.float64)
    memory = torch.cat([states[0][:, 1:], states[2][:, 1:]], 1)
    ca = fuser.cross_attn(fuser.query_norm(q), reference, fuser.feat_norm(memory), [(3, 3), (3, 3)])
    sa = fuser.self_attn(fuser.norm1(ca), reference, fuser.norm1(ca), [(3, 3)])
    torch.testing.assert_close(fuser.fuse(states), q + fuser.gamma1 * (ca + fuser.gamma2 * sa), rtol=0, atol=1e-12)


def test_cls_token_is_kept_unchanged_with_cls_patch():
    torch.manual_seed(0)
    fuser = MMFuser(32, (3, 3), 3, [1, 2], num_heads=4, num_points=2, has_cls=True, keep_cls=True)
    randomise(fuser)
    states = tuple(torch.randn(2, 10, 32) for _ in range(4))
    out = fuser.fuse(states)
    assert out.shape == (2, 10, 32) and torch.equal(out[:, 0], states[3][:, 0])
    assert not torch.allclose(out[:, 1:], states[3][:, 1:])


def test_wrong_grid_is_a_clear_error():
    fuser = MMFuser(32, (3, 3), 3, [1, 2], num_heads=4, num_points=2)
    with pytest.raises(ValueError, match="3x3 patch map"):
        fuser.fuse(tuple(torch.randn(1, 17, 32) for _ in range(4)))


# ---- 2. the config switch ----------------------------------------------------------------------------------------


def test_default_layers_are_the_references_for_clip_l():
    config = PolyfocusConfig(fusion="mmfuser")  # CLIP-L/336 tower by default, mm_vision_select_layer -2
    assert config.mmfuser_layers() == (23, [3, 8, 13, 18])  # the reference's list-22/-17/-12/-7/-2
    assert PolyfocusConfig(fusion="mmfuser", mmfuser_kv_layers=[-22, -17, -12, -7]).mmfuser_layers() == \
        (23, [3, 8, 13, 18])
    assert tiny_config(fusion="mmfuser").mmfuser_layers() == (2, [0, 1])  # a 3-layer tower
    assert tiny_config(fusion="mmfuser", mm_vision_select_layer=-1).mmfuser_layers() == (3, [0, 1, 2])


@pytest.mark.parametrize("fields,message", [
    (dict(fusion="mmfuser", mm_vision_select_layer=[-3, -2]), "must be a single index"),
    (dict(fusion="mmfuser", mmfuser_kv_layers=[0, 2]), "below the query layer 2"),
    (dict(fusion="mmfuser", mmfuser_kv_layers=[1, 1]), "distinct layers"),
    (dict(fusion="mmfuser", mmfuser_kv_layers=[7]), "the tower has 4"),
    (dict(fusion="mmfuser", mmfuser_kv_layers=[]), "non-empty list"),
    (dict(fusion="mmfuser", mmfuser_num_heads=5), "must divide the vision tower's width 32"),
    (dict(fusion="mmfuser", mmfuser_num_points=0), "at least 1"),
    (dict(fusion="mmfuser", mm_vision_select_layer=0), "the embeddings"),
    (dict(fusion="no-such-fusion"), "fusion must be None, one of 'mmfuser'"),
    (dict(mmfuser_num_heads=8), "fusion is None"),
])
def test_bad_fusion_config_is_a_clear_error(fields, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**fields)


# ---- 3. the model: identical to the plain model at init ----------------------------------------------------------

VARIANTS = {
    "clip_patch": {},
    "clip_cls_patch": {"mm_vision_select_feature": "cls_patch"},
    "siglip": {"vision": "siglip"},
    "width_48_grid_5x5_8_heads": {"vision_hidden_size": 48, "image_size": 70, "mmfuser_num_heads": 8},
    "deep_tower_explicit_levels": {"vision_layers": 6, "mmfuser_kv_layers": [1, 3, 4], "mmfuser_num_points": 3},
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_outputs_equal_the_plain_models_at_init(variant):
    plain, fused = plain_and_fused(**VARIANTS[variant])
    ids, pixels = batch(fused.config)
    assert torch.equal(fused.get_image_features(pixels), plain.get_image_features(pixels))
    logits = fused(input_ids=ids, pixel_values=pixels).logits
    assert torch.equal(logits, plain(input_ids=ids, pixel_values=pixels).logits)
    randomise(fused.mm_fusion)  # and the fuser is really in the path
    assert not torch.allclose(fused.get_image_features(pixels), plain.get_image_features(pixels))


def test_same_seed_gives_the_plain_tower_and_llm():
    """mm_fusion is built after the LLM, so a seed gives the same tower and LLM with or without it."""
    torch.manual_seed(0)
    plain = PolyfocusForConditionalGeneration(tiny_config())
    torch.manual_seed(0)
    fused = PolyfocusForConditionalGeneration(tiny_config(fusion="mmfuser"))
    fused_state = fused.state_dict()
    for key, value in plain.state_dict().items():
        if key.startswith(("vision_tower.", "language_model.")):
            assert torch.equal(value, fused_state[key]), key


def test_plain_checkpoint_with_fusion_switched_on_gets_the_fusers_own_init(tmp_path):
    """from_pretrained initialises the missing fuser with its own init (zero gammas, Deformable-DETR's offsets and
    weights), not transformers' generic one nor leftover memory, and leaves everything loaded alone."""
    plain, _ = plain_and_fused()
    plain.save_pretrained(tmp_path)
    config = PolyfocusConfig(**{**PolyfocusConfig.from_pretrained(tmp_path).to_dict(), "fusion": "mmfuser"})
    model, info = PolyfocusForConditionalGeneration.from_pretrained(tmp_path, config=config, output_loading_info=True)
    assert set(info["missing_keys"]) == {"mm_fusion." + k for k in model.mm_fusion.state_dict()}
    fuser = model.mm_fusion
    assert not fuser.gamma1.any() and not fuser.gamma2.any()
    for norm in (fuser.query_norm, fuser.feat_norm, fuser.norm1):
        assert torch.equal(norm.weight, torch.ones_like(norm.weight)) and not norm.bias.any()
    for attn, levels in ((fuser.cross_attn, 2), (fuser.self_attn, 1)):
        star = attn.sampling_offsets.bias.view(16, levels, 4, 2)
        assert torch.allclose(star[2], torch.tensor([[[1.0, 1], [2, 2], [3, 3], [4, 4]]] * levels))
        assert not attn.sampling_offsets.weight.any()
        assert not attn.attention_weights.weight.any() and not attn.attention_weights.bias.any()
        for linear in (attn.value_proj, attn.output_proj):
            bound = math.sqrt(6 / (2 * linear.in_features))
            assert linear.weight.abs().max() <= bound and linear.weight.std() > bound / 3 and not linear.bias.any()
    ids, pixels = batch(model.config)
    assert torch.equal(model.eval()(input_ids=ids, pixel_values=pixels).logits,
                       plain(input_ids=ids, pixel_values=pixels).logits)


def test_save_and_load_round_trip(tmp_path):
    _, fused = plain_and_fused(mm_vision_select_feature="cls_patch", mmfuser_num_points=3)
    randomise(fused.mm_fusion)
    fused.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and not list(tmp_path.glob("*.bin"))
    saved = json.loads((tmp_path / "config.json").read_text())
    assert (saved["fusion"], saved["mmfuser_num_points"]) == ("mmfuser", 3)
    assert {k for k in load_file(tmp_path / "model.safetensors") if k.startswith("mm_fusion.")} == \
        {"mm_fusion." + k for k in fused.mm_fusion.state_dict()}
    loaded = load_model(tmp_path).eval()
    assert checkpoint_format(tmp_path) == "polyfocus"
    for key, value in fused.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    ids, pixels = batch(fused.config)
    logits = loaded(input_ids=ids, pixel_values=pixels).logits
    assert torch.equal(logits, fused(input_ids=ids, pixel_values=pixels).logits)


def test_text_only_training_batch_keeps_the_fuser_in_the_graph():
    """DDP and ZeRO expect a gradient for every trainable parameter, also on batches without images."""
    _, fused = plain_and_fused()
    fused.train()
    ids = torch.tensor([[1, 5, 6, 7]])
    fused(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in fused.mm_fusion.parameters())


def test_bf16_model_runs_on_cpu():
    _, fused = plain_and_fused()
    randomise(fused.mm_fusion)
    ids, pixels = batch(fused.config)
    want = fused(input_ids=ids, pixel_values=pixels).logits
    fused.to(torch.bfloat16).train()
    out = fused(input_ids=ids, pixel_values=pixels, labels=ids)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    assert (out.logits.float() - want).abs().max() < 0.1
    out.loss.backward()
    assert fused.mm_fusion.gamma1.grad.dtype == torch.bfloat16 and fused.mm_fusion.gamma1.grad.any()


def test_export_to_transformers_llava_is_refused():
    _, fused = plain_and_fused()
    with pytest.raises(ValueError, match="no fusion module"):
        to_llava_hf(fused)


def test_lora_trains_and_saves_the_fuser_in_full(tmp_path):
    from polyfocus.train import run
    from polyfocus.train.args import ModelArguments

    _, fused = plain_and_fused()
    model_args = ModelArguments(lora_enable=True, lora_r=4, lora_alpha=8)
    peft_model = run.set_trainable(fused, model_args, str(tmp_path))
    assert "mm_fusion" in peft_model.peft_config["default"].modules_to_save
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert any(".mm_fusion.modules_to_save." in n for n in trainable)
    peft_model.save_pretrained(tmp_path / "adapter")
    assert any("mm_fusion" in k for k in load_file(tmp_path / "adapter" / "adapter_model.safetensors"))


# ---- 4. the reference repo's checkpoint layout -------------------------------------------------------------------


def reference_state_dict(model, with_tower=True):
    """Our weights under MMFuser's reference names: LLaVA's layout with the fuser as projector entry 0 and the MLP's
    Linears at 1 and 3 (Sequential[MSCrossAttnBlock, Linear, GELU, Linear])."""
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith("mm_fusion."):
            state["model.mm_projector.0." + key[len("mm_fusion."):]] = value
        elif key.startswith("mm_projector."):
            index, rest = key[len("mm_projector."):].split(".", 1)
            state[f"model.mm_projector.{int(index) + 1}.{rest}"] = value
        elif key.startswith("vision_tower."):
            if with_tower:
                state["model.vision_tower.vision_tower.vision_model." + key[len("vision_tower."):]] = value
        else:
            state[key[len("language_model."):]] = value  # model.* (the LLM) and lm_head.weight
    return state


def reference_model():
    """A 6-layer tower, so that the reference's 5 distinct layers exist: -6/-5/-4/-3 key/values, -2 the query."""
    _, fused = plain_and_fused(vision_layers=6, mmfuser_kv_layers=[-6, -5, -4, -3])
    randomise(fused.mm_fusion)
    return fused


def logits_of(model, image_token_id):
    ids, pixels = batch(model.config)
    return model(input_ids=ids.masked_fill(ids == IMG, image_token_id), pixel_values=pixels).logits


@pytest.mark.parametrize("select_layer", [[-6, -5, -4, -3, -2], "list-6/-5/-4/-3/-2"])
def test_reference_checkpoint_loads(tmp_path, select_layer):
    model = reference_model()
    write_clip_tower(model, tmp_path / "clip")
    ckpt = tmp_path / "llava-mmfuser"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps(llava_config(model, tmp_path / "clip",
                                                              mm_vision_select_layer=select_layer)))
    write_shards(reference_state_dict(model), ckpt, "safetensors")
    assert checkpoint_format(ckpt) == "llava"
    loaded = load_model(ckpt).eval()
    assert loaded.config.fusion == "mmfuser" and loaded.config.mmfuser_layers() == (5, [1, 2, 3, 4])
    assert torch.equal(logits_of(loaded, -200), logits_of(model, IMG))
    loaded.save_pretrained(tmp_path / "ours")  # and it saves in our layout
    assert torch.equal(logits_of(load_model(tmp_path / "ours").eval(), -200), logits_of(model, IMG))


def test_reference_stage1_projector_on_a_base_llm(tmp_path):
    """MMFuser's mm_projector.bin holds the fuser too (keys model.mm_projector.{0,1,3}.*), both through load_model and
    through a training run's pretrain_mm_mlp_adapter."""
    from polyfocus.train.run import load_projector

    model = reference_model()
    write_clip_tower(model, tmp_path / "clip")
    write_base_llm(model, tmp_path / "vicuna")
    stage1 = tmp_path / "llava-mmfuser-pretrain"
    stage1.mkdir()
    (stage1 / "config.json").write_text(json.dumps(llava_config(model, tmp_path / "clip", tune_mm_mlp_adapter=True,
                                                                mm_vision_select_layer=[-6, -5, -4, -3, -2])))
    projector = {k: v for k, v in reference_state_dict(model).items() if k.startswith("model.mm_projector.")}
    torch.save(projector, stage1 / "mm_projector.bin")
    assert checkpoint_format(stage1) == "projector"
    loaded = load_model(stage1, model_base=tmp_path / "vicuna").eval()
    assert torch.equal(logits_of(loaded, -200), logits_of(model, IMG))

    _, fresh = plain_and_fused(vision_layers=6, mmfuser_kv_layers=[-6, -5, -4, -3])
    load_projector(fresh, str(stage1 / "mm_projector.bin"))
    for key, value in model.state_dict().items():
        if key.startswith(("mm_fusion.", "mm_projector.")):
            assert torch.equal(fresh.state_dict()[key], value), key


# ---- 5. training: the recipes, from backbones, both stages -------------------------------------------------------

CPU = ["--tf32", "false", "--bf16", "false", "--deepspeed", "", "--report_to", "none", "--dataloader_num_workers", "0",
       "--per_device_train_batch_size", "2", "--max_steps", "3", "--save_strategy", "no", "--warmup_ratio", "0",
       "--plot_loss", "false"]
TINY_TOWER_LEVELS = ["--mmfuser_kv_layers", "0", "1"]  # the recipes name CLIP-L's 3/8/13/18; a 3-layer tower has 0..3


@pytest.fixture(scope="module")
def backbones(tmp_path_factory):
    """A tiny "Vicuna" and "CLIP" pair (LLaVA's stage-1 starting point) and synthworld data."""
    from polyfocus.synthworld.scenes import export

    root = tmp_path_factory.mktemp("mmfuser_train")
    write_tiny_backbones(root, 56)
    export(str(root / "pretrain_data"), 6, image_size=112, families=["colour"], split="pretrain")
    export(str(root / "data"), 6, image_size=112, families=["colour", "shape"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as m:
        m.chdir(root)
        yield root
    torch.set_num_threads(threads)


def lr_of(trainer) -> dict[str, float]:
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    return {names[id(p)]: g["initial_lr"] for g in trainer.optimizer.param_groups for p in g["params"]}


@pytest.mark.slow
def test_recipes_train_the_fuser_in_both_stages_with_its_own_learning_rate(backbones, monkeypatch):
    """configs/mmfuser/llava-1.5-7b-{pretrain,finetune}.yaml on tiny models: stage 1 builds the model from the LLM
    and tower directories with `fusion: mmfuser` from the YAML, starting as the plain model (gammas 0); the fuser
    trains in both stages in its own learning-rate group (stage 1: mm_fusion_lr next to the projector's 1e-3; stage 2
    through MMFuser's own flag name, ms_cross_attn_lr)."""
    recipes = REPO / "configs" / "mmfuser"
    stage1 = train_recording(monkeypatch, recipes / "llava-1.5-7b-pretrain.yaml", CPU + TINY_TOWER_LEVELS + [
        "--model_name_or_path", "vicuna", "--vision_tower", "clip", "--data_path", "pretrain_data/pretrain.json",
        "--image_folder", "pretrain_data", "--output_dir", "stage1",
        # At the recipe's 1e-4 the third step's update of norm1.weight (~ gamma1 * gamma2) is below fp32's resolution
        # at 1.0; a larger rate lets every tensor visibly move in 3 steps (test_configs checks the recipe's value).
        "--mm_fusion_lr", "5e-3"])
    model = stage1.model
    assert model.config.fusion == "mmfuser" and model.config.mmfuser_layers() == (2, [0, 1])
    assert not stage1.initial["mm_fusion.gamma1"].any()  # built for real (not left on the meta device), identity
    fusion = {k for k in stage1.initial if k.startswith("mm_fusion.")}
    assert changed(stage1) == fusion | {k for k in stage1.initial if k.startswith("mm_projector.")}
    lrs = lr_of(stage1)
    assert {lrs[n] for n in lrs if n.startswith("mm_fusion.")} == {5e-3}
    assert {lrs[n] for n in lrs if n.startswith("mm_projector.")} == {1e-3}

    stage2 = train_recording(monkeypatch, recipes / "llava-1.5-7b-finetune.yaml", CPU + [
        "--model_name_or_path", "stage1", "--data_path", "data/train.json", "--image_folder", "data",
        "--output_dir", "stage2", "--ms_cross_attn_lr", "1e-5"])
    assert stage2.initial["mm_fusion.gamma1"].any()  # stage 1's fuser came along
    moved = changed(stage2)
    assert fusion <= moved and any(k.startswith("language_model.") for k in moved)
    assert not any(k.startswith("vision_tower.") for k in moved)
    lrs = lr_of(stage2)
    assert {lrs[n] for n in lrs if n.startswith("mm_fusion.")} == {1e-5}
    assert {lrs[n] for n in lrs if not n.startswith("mm_fusion.")} == {2e-5}
    assert load_model("stage2").config.fusion == "mmfuser"


def test_freeze_mm_mlp_adapter_freezes_the_fuser_too():
    """In the reference the fuser is mm_projector entry 0, so LLaVA's freeze_mm_mlp_adapter freezes it as well."""
    from polyfocus.train.freeze import configure_trainable, trainable_parts

    _, fused = plain_and_fused()
    configure_trainable(fused, trainable_parts(tune_mm_mlp_adapter=False, freeze_backbone=False,
                                               freeze_mm_mlp_adapter=True))
    trains = {n.split(".")[0] for n, p in fused.named_parameters() if p.requires_grad}
    assert trains == {"language_model"}


def test_fusion_from_a_multimodal_checkpoint_is_refused(backbones, tmp_path):
    """A checkpoint's architecture is fixed: fusion cannot be switched on by a training flag there (convert or
    from_pretrained with a config does it)."""
    from polyfocus.train import run

    tiny = PolyfocusForConditionalGeneration(tiny_config())
    tiny.save_pretrained(tmp_path / "ckpt")
    config = tmp_path / "r.yaml"
    config.write_text(yaml.safe_dump({"model_name_or_path": str(tmp_path / "ckpt"), "tokenizer_name_or_path": "vicuna",
                                      "fusion": "mmfuser", "output_dir": str(tmp_path / "o")}))
    from polyfocus.train.args import parse_args

    model_args, data_args, training_args = parse_args(str(config), ["--use_cpu", "true"])
    with pytest.raises(ValueError, match="cannot be changed"):
        run.build_model(model_args, data_args, training_args, run.load_tokenizer(model_args))


def test_demo_model_config_switches_fusion_on_in_stage_1(tmp_path, monkeypatch):
    """`polyfocus demo --model-config '{"fusion": "mmfuser"}'`: the fuser reaches the stage-1 recipe, which builds
    the model (the training and evaluation themselves are stubbed out here)."""
    from polyfocus import demo
    from polyfocus.train import run
    from polyfocus.train.args import parse_args

    seen = []
    trainer = SimpleNamespace(state=SimpleNamespace(log_history=[], global_step=1),  # what the stage line reads
                              model=SimpleNamespace(vision_feature_cache=None))  # and what the next stage is handed
    monkeypatch.setattr(run, "train", lambda config, overrides=(), feature_cache=None: seen.append(config) or trainer)
    monkeypatch.setattr(demo, "evaluate_model", lambda *a, **k: ("", {}, {}))
    monkeypatch.setattr(demo, "ask_fresh_image", lambda *a, **k: "")
    demo.run(str(tmp_path / "demo"), train_scenes=2, test_scenes=1, steps=(1, 1), image_size=56, batch_size=2,
             model_config={"hidden_size": 32, "fusion": "mmfuser", "mmfuser_num_heads": 8}, tower_steps=0,
             tower="scratch")
    stage1 = yaml.safe_load((tmp_path / "demo" / "stage1.yaml").read_text())
    assert (stage1["fusion"], stage1["mmfuser_num_heads"]) == ("mmfuser", 8)
    model_args = parse_args(seen[0])[0]
    assert (model_args.fusion, model_args.mmfuser_num_heads) == ("mmfuser", 8)
