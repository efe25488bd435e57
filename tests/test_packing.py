"""Packed batches (polyfocus/data/packing.py): the first-fit layout, the collator's rows (positions, labels, images,
MG-LLaVA's boxes), and exactness in fp32: in a packed batch each sample has the loss and the gradients it has alone,
and a packed batch equals the padded batch of the same samples for every method (VW-LMM's visual-word loss at a
sample boundary and MG-LLaVA's object tokens included). The training runs (packed = unpacked, LoRA, gradient
accumulation, DDP, resume after SIGKILL) are in test_train.py.

Tolerances: fp32 throughout; losses to rtol 1e-5, gradients to atol 1e-6 + rtol 1e-4 (the packed and the single
forward differ only in the order of floating-point sums: the attention over a masked row, batched matmuls).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from polyfocus import PolyfocusForConditionalGeneration
from polyfocus.data.dataset import DataCollator
from polyfocus.data.packing import PackingCollator, first_fit, pack
from polyfocus.data.templates import IGNORE_INDEX
from polyfocus.model.presets import tiny_config
from polyfocus.model.visual_words import visual_word_loss

IMG, PAD = 4, 0
BUDGET = 64  # tokens a row: the mixed batch below (165 tokens, 171 with boxes) takes 3 rows
TINY_HIRES = {"depths": [1, 1, 2, 1], "hidden_sizes": [8, 16, 24, 32]}  # as test_mg_llava.py


def feature(config, seed: int, images: int = 1, text: int = 6, bos: bool = True, boxes: int = 0) -> dict:
    """A dataset item: [BOS] then, per image, its tokens and a short prompt, then `text` supervised tokens.
    boxes: MG-LLaVA's object boxes per image (each adds one image token)."""
    g = torch.Generator().manual_seed(seed)
    vocab = config.text_config.vocab_size
    ids = [1] if bos else []
    for _ in range(images):
        ids += [IMG] * (config.num_image_tokens + boxes) + torch.randint(10, vocab, (2,), generator=g).tolist()
    prompt = len(ids)
    ids += torch.randint(10, vocab, (text,), generator=g).tolist()
    size = config.image_input_size
    item = {"input_ids": torch.tensor(ids), "labels": torch.tensor([IGNORE_INDEX] * prompt + ids[prompt:]),
            "pixel_values": torch.randn(images, 3, size, size, generator=g) if images else None, "id": f"s{seed}"}
    if boxes:  # [K, 5]: (image index in the sample, x1, y1, x2, y2) in hires pixels
        corners = torch.rand(images * boxes, 2, generator=g) * size / 2
        item["image_boxes"] = torch.cat([torch.arange(images).repeat_interleave(boxes)[:, None].float(),
                                         corners, corners + size / 3], dim=1)
    return item


def mixed_features(config, boxes: int = 0) -> list[dict]:
    """Lengths that pack unevenly: three images, one, none (text only), one whose image is its first token and a
    text whose first token is supervised (both packed behind another sample)."""
    return [feature(config, 0, images=1, text=9, boxes=boxes), feature(config, 1, images=0, text=25),
            feature(config, 2, images=3, text=3, boxes=boxes), feature(config, 3, images=1, text=4, boxes=boxes),
            feature(config, 4, images=0, text=5), feature(config, 5, images=1, text=2, bos=False, boxes=boxes),
            feature(config, 6, images=0, text=4, bos=False)]  # every label supervised, the first one too


def make_model(seed: int = 0, attn: str = "sdpa", **fields) -> PolyfocusForConditionalGeneration:
    torch.manual_seed(seed)
    model = PolyfocusForConditionalGeneration(tiny_config(**fields))
    model.config._attn_implementation = attn
    with torch.no_grad():  # off the init (zero gammas, identity gates): every part shapes the loss
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.train()  # as in training: dropout is 0 in the tiny configs; the LLM's config keeps use_cache on


def sum_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy of one sequence: logits [L, V], labels [L]."""
    return F.cross_entropy(logits[:-1].float(), labels[1:], ignore_index=IGNORE_INDEX, reduction="sum")


def grads(loss, params) -> list[torch.Tensor]:
    return [g if g is not None else torch.zeros_like(p)
            for g, p in zip(torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True), params)]


def assert_grads_close(got, want):
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


# ---- 1. the layout -------------------------------------------------------------------------------------------------


def test_first_fit_decreasing():
    # Longest first (8, 7, 5, 3, 2, 2), each into the first row with room: [8, 2], [7, 3], [5, 2].
    assert first_fit([5, 3, 8, 2, 2, 7], 10) == [[2, 3], [5, 1], [0, 4]]
    assert first_fit([4, 4, 4], 4) == [[0], [1], [2]]  # equal lengths keep their order
    assert first_fit([12, 3], 10) == [[0], [1]]  # longer than the budget: a row of its own
    assert first_fit([3, 3, 3], 100) == [[0, 1, 2]]


def test_pack_keeps_first_fits_rows_and_narrows_them():
    """Filled up to the budget, first-fit leaves a 1003-wide row and three narrower ones (4012 positions for 3203
    tokens); the narrowest width at which it still needs 4 rows is 883, the best any 4 rows can do (the 583 must
    share a row, at best with the 300; alone, three of the other seven would share one: >= 970)."""
    lengths = [583, 450, 420, 400, 380, 350, 320, 300]
    assert max(sum(lengths[i] for i in row) for row in first_fit(lengths, 1024)) == 1003
    rows = pack(lengths, 1024)
    widths = [sum(lengths[i] for i in row) for row in rows]
    assert len(rows) == 4 and max(widths) == 883 and sorted(i for row in rows for i in row) == list(range(8))
    g = torch.Generator().manual_seed(0)
    for _ in range(200):  # never more positions than first-fit up to the budget, never a row over it
        lengths = torch.randint(1, 60, (int(torch.randint(1, 17, (1,), generator=g)),), generator=g).tolist()
        budget = int(torch.randint(60, 200, (1,), generator=g))
        rows, greedy = pack(lengths, budget), first_fit(lengths, budget)
        assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
        widths = [sum(lengths[i] for i in row) for row in rows]
        assert max(widths) <= budget
        assert len(rows) * max(widths) <= len(greedy) * max(sum(lengths[i] for i in row) for row in greedy)
        assert pack(lengths, budget) == rows  # deterministic


def test_collator_rows_positions_labels_and_images():
    config = tiny_config(hires_config=TINY_HIRES, object_tokens=True)
    features = mixed_features(config, boxes=1)
    lengths = [len(f["input_ids"]) for f in features]
    batch = PackingCollator(PAD, BUDGET)(features)
    rows = pack(lengths, BUDGET)
    width = max(sum(lengths[i] for i in row) for row in rows)
    assert len(rows) < len(features) and batch["input_ids"].shape == (len(rows), width) and width <= BUDGET
    assert "attention_mask" not in batch  # transformers derives the per-sample mask only without one
    order = [i for row in rows for i in row]
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            n = lengths[i]
            assert torch.equal(batch["input_ids"][r, start:start + n], features[i]["input_ids"])
            assert torch.equal(batch["position_ids"][r, start:start + n], torch.arange(n))
            assert batch["labels"][r, start] == IGNORE_INDEX  # never a target across the boundary
            assert torch.equal(batch["labels"][r, start + 1:start + n], features[i]["labels"][1:])
            start += n
        assert (batch["input_ids"][r, start:] == PAD).all() and (batch["labels"][r, start:] == IGNORE_INDEX).all()
        assert torch.equal(batch["position_ids"][r, start:], torch.arange(width - start))  # a segment of its own
    # Images in the order of their tokens, row-major; box indices count images from the batch's first.
    images = [f["pixel_values"] for f in (features[i] for i in order) if f["pixel_values"] is not None]
    assert torch.equal(batch["pixel_values"], torch.cat(images))
    first, want = 0, []
    for i in order:
        if features[i].get("image_boxes") is not None:
            want.append(features[i]["image_boxes"] + torch.tensor([first, 0, 0, 0, 0]))
        first += 0 if features[i]["pixel_values"] is None else len(features[i]["pixel_values"])
    assert torch.equal(batch["image_boxes"], torch.cat(want))


def test_collator_budget_one_row_and_errors():
    config = tiny_config()
    features = mixed_features(config)
    total = sum(len(f["input_ids"]) for f in features)
    one = PackingCollator(PAD)(features)  # no budget (FlashAttention): one row, no padding at all
    assert one["input_ids"].shape == (1, total) and (one["position_ids"] == 0).sum() == len(features)
    wide = PackingCollator(PAD, max_length=total)(features)
    assert wide["input_ids"].shape == (1, total)
    longest = max(len(f["input_ids"]) for f in features)  # a budget below the longest sample: rows that wide
    assert PackingCollator(PAD, max_length=1)(features)["input_ids"].shape[1] == longest
    with pytest.raises(ValueError, match=r"sample 's0' has 28 tokens > model_max_length 27"):
        PackingCollator(PAD, model_max_length=27)(features)
    with pytest.raises(ValueError, match="max_length must be positive"):
        PackingCollator(PAD, max_length=0)


# ---- 2. exactness ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text,attn,one_row", [("llama", "sdpa", False), ("llama", "eager", False),
                                                ("llama", "sdpa", True), ("mistral", "sdpa", False),
                                                ("qwen2", "sdpa", False), ("qwen3", "sdpa", False)])
def test_each_packed_sample_has_its_own_loss_and_gradients(text, attn, one_row):
    """Per sample: its summed CE read off the packed batch's logits, and that CE's gradient with respect to every
    parameter, equal the sample's own forward and backward alone. Any attention across a boundary, a position that
    does not restart, an image fed to the wrong sample or a label predicted across a boundary would break it."""
    model = make_model(text=text, attn=attn)
    params = [p for p in model.parameters() if p.requires_grad]
    features = mixed_features(model.config)
    lengths = [len(f["input_ids"]) for f in features]
    batch = PackingCollator(PAD, None if one_row else BUDGET)(features)
    rows = [list(range(len(features)))] if one_row else pack(lengths, BUDGET)
    assert len(rows) < len(features)
    logits = model(**batch).logits
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            n = lengths[i]
            packed = sum_ce(logits[r, start:start + n], features[i]["labels"])
            alone_batch = DataCollator(PAD)([features[i]])
            alone = sum_ce(model(**alone_batch).logits[0], features[i]["labels"])
            torch.testing.assert_close(packed, alone, rtol=1e-5, atol=0)
            assert_grads_close(grads(packed, params), grads(alone, params))
            start += n


METHODS = {
    "plain": {},
    "visual_words": {"visual_words": True},
    "pseudo_image_features": {"visual_words": True, "pseudo_image_features": True},
    "mmfuser": {"fusion": "mmfuser"},
    "s2": {"fusion": "s2", "s2_scales": [56, 112]},  # DenseFusion's multi-scale features
    "mg_llava": {"hires_config": TINY_HIRES, "fusion": "convgate", "object_tokens": True},
}


@pytest.mark.parametrize("method", METHODS)
def test_packed_batch_equals_padded_batch(method):
    """The model's loss (mean CE over the batch's supervised tokens, plus VW-LMM's KL averaged over the image
    positions that have a predictor) and its gradients are the padded batch's. One sample begins with its image:
    packed behind another sample, that image's first position must not be predicted by the other's last token."""
    model = make_model(**METHODS[method])
    params = [p for p in model.parameters() if p.requires_grad]
    features = mixed_features(model.config, boxes=1 if model.config.object_tokens else 0)
    packed, padded = PackingCollator(PAD, BUDGET)(features), DataCollator(PAD)(features)
    starts = (packed["position_ids"] == 0) & (packed["input_ids"] == IMG)
    assert starts[:, 1:].any()  # an image at a sample's first position, behind another sample
    out_packed, out_padded = model(**packed), model(**padded)
    torch.testing.assert_close(out_packed.loss, out_padded.loss, rtol=1e-5, atol=0)
    if model.config.visual_words:
        torch.testing.assert_close(out_packed.vw_loss, out_padded.vw_loss, rtol=1e-5, atol=0)
    assert_grads_close(grads(out_packed.loss, params), grads(out_padded.loss, params))


def test_visual_word_predictor_is_never_the_previous_samples_token():
    """visual_word_loss with packed positions: an image token at position 0 in the middle of a row has no predictor
    (the row index alone would take the previous sample's last logits)."""
    g = torch.Generator().manual_seed(0)
    logits, words = torch.randn(1, 5, 7, generator=g), torch.randn(2, 7, generator=g)
    is_image = torch.tensor([[False, True, False, True, False]])
    packed = torch.tensor([[0, 1, 2, 0, 1]])  # a second sample starts with its image at index 3
    alone = visual_word_loss(logits, is_image, words, position_ids=packed)
    want = F.kl_div(F.log_softmax(logits[0, 0], -1), F.log_softmax(words[0], -1), reduction="sum", log_target=True)
    torch.testing.assert_close(alone, want)  # only the first image, predicted from index 0
    assert not torch.allclose(visual_word_loss(logits, is_image, words), want)  # by index: both images count


# ---- 3. on a GPU (marked gpu: skipped without CUDA; not yet run) ----------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("attn", ["sdpa", "flash_attention_2"])
def test_packed_losses_on_cuda(attn):
    """SDPA's block-diagonal mask (rows of BUDGET) and FlashAttention 2's varlen path (one row, boundaries from the
    position ids) give each sample its own loss, in bf16 (FlashAttention needs it): rtol 2e-2."""
    if attn == "flash_attention_2":
        pytest.importorskip("flash_attn", reason="pip install flash-attn for the varlen path")
    model = make_model(attn=attn).to("cuda", torch.bfloat16)
    features = mixed_features(model.config)
    lengths = [len(f["input_ids"]) for f in features]
    budget = None if attn.startswith("flash") else BUDGET
    rows = [list(range(len(features)))] if budget is None else pack(lengths, budget)
    def to_cuda(batch):
        batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}
        return {**batch, "pixel_values": batch["pixel_values"].to(torch.bfloat16)}

    with torch.no_grad():
        logits = model(**to_cuda(PackingCollator(PAD, budget)(features))).logits
        for r, row in enumerate(rows):
            start = 0
            for i in row:
                n, labels = lengths[i], features[i]["labels"].cuda()
                alone = model(**to_cuda(DataCollator(PAD)([features[i]]))).logits[0]
                torch.testing.assert_close(sum_ce(logits[r, start:start + n], labels), sum_ce(alone, labels),
                                           rtol=2e-2, atol=0)
                start += n
