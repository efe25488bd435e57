import json
import logging

import pytest
import torch
from PIL import Image

from polyfocus.data.dataset import DataCollator, Skipped, SupervisedDataset
from polyfocus.data.formats import DataError
from polyfocus.data.images import ImageProcessor, load_image
from polyfocus.data.sampler import LengthGroupedSampler, modality_length_grouped_indices, split_to_even_chunks
from polyfocus.data.templates import IGNORE_INDEX, encode, get_template, move_image_to_front
from polyfocus.data.tokenizer import default_tokenizer

SEQ = 4  # visual tokens per image in these tests
MAX_LEN = 256


def turns(*pairs, image=False):
    conv = []
    for k, (q, a) in enumerate(pairs):
        q = "What is this?\n<image>" if image and k == 0 else q
        conv += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    return conv


GOOD = [
    {"id": "img1", "image": "red.png", "conversations": turns(("", "A red square."), image=True), "family": "colour"},
    {"id": "txt1", "conversations": turns(("How are you?", "Fine, thanks."))},
    {"id": "two", "image": ["red.png", "blue.png"],
     "conversations": [{"from": "human", "value": "<image>\n<image>\nSame colour?"}, {"from": "gpt", "value": "No."}]},
]


@pytest.fixture(scope="module")
def tok():
    return default_tokenizer()


@pytest.fixture
def root(tmp_path):
    Image.new("RGB", (20, 10), (255, 0, 0)).save(tmp_path / "red.png")
    Image.new("RGB", (10, 30), (0, 0, 255)).save(tmp_path / "blue.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    write_truncated_png(tmp_path / "truncated.png")
    return tmp_path


def write_truncated_png(path):
    """A PNG cut in its pixel data: the header (format, size) reads, a full decode fails."""
    import io

    import numpy as np

    data = io.BytesIO()
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (32, 32, 3), dtype=np.uint8)).save(data, "PNG")
    path.write_bytes(data.getvalue()[: len(data.getvalue()) // 2])


def make(root, tok, records, name="train.json", **kw):
    path = root / name
    path.write_text(json.dumps(records) if name.endswith(".json") else "".join(json.dumps(r) + "\n" for r in records))
    args = dict(image_root=root, tokenizer=tok, template="vicuna_v1", image_processor=ImageProcessor(image_size=16),
                image_token_id=tok.convert_tokens_to_ids("<image>"), image_seq_len=SEQ, model_max_length=MAX_LEN)
    args.update(kw)
    return SupervisedDataset(path, **args)


def canonical(record):
    role = {"human": "user", "gpt": "assistant", "system": "system"}
    return [{"role": role[t["from"]], "content": t["value"]} for t in record["conversations"]]


# ---- items ---------------------------------------------------------------------------------------------------


def test_item_matches_template_encoding_and_processor(root, tok):
    ds = make(root, tok, GOOD)
    assert len(ds) == 3
    image_id = tok.convert_tokens_to_ids("<image>")
    vicuna = get_template("vicuna_v1")
    for i, record in enumerate(GOOD):
        item = ds[i]
        messages = canonical(record)
        n_images = len(item["pixel_values"]) if item["pixel_values"] is not None else 0
        if n_images:
            messages = move_image_to_front(messages)  # LLaVA's "question\n<image>" -> "<image>\nquestion"
        expected = encode(messages, tok, vicuna, image_id, [SEQ] * n_images)
        assert item["id"] == record["id"]
        assert item["input_ids"].tolist() == expected.input_ids
        assert item["labels"].tolist() == expected.labels
        assert item["input_ids"].dtype == item["labels"].dtype == torch.long
    assert ds[1]["pixel_values"] is None
    pix = ds[2]["pixel_values"]
    assert pix.shape == (2, 3, 16, 16)
    proc = ImageProcessor(image_size=16)
    assert torch.equal(pix, proc([load_image(root / "red.png"), load_image(root / "blue.png")]))
    # "question\n<image>" was moved: the image tokens come right after the system prompt + "USER: ".
    ids = ds[0]["input_ids"].tolist()
    assert ids.count(image_id) == SEQ and ids[ids.index(image_id) - 1] != image_id


def test_image_seq_len_callable_and_lengths(root, tok):
    # One extra token per image index (a stand-in for e.g. one token per object box).
    ds = make(root, tok, GOOD, image_seq_len=lambda sample, k: SEQ + k)
    image_id = tok.convert_tokens_to_ids("<image>")
    assert ds[2]["input_ids"].tolist().count(image_id) == SEQ + SEQ + 1
    words = [sum(len(t["value"].split()) for t in r["conversations"]) for r in GOOD]
    assert ds.lengths == [words[0] + SEQ, words[1], words[2] + 2 * SEQ + 1]
    assert ds.modality_lengths == [words[0] + SEQ, -words[1], words[2] + 2 * SEQ + 1]


def test_image_root_defaults_to_annotation_dir(root, tok):
    ds = make(root, tok, GOOD, image_root=None)
    assert ds[0]["pixel_values"].shape == (1, 3, 16, 16)


# ---- bad input -----------------------------------------------------------------------------------------------

BAD = [  # (record, reason, found at init?)
    ({"id": "bad_role", "conversations": [{"from": "bot", "value": "hi"}]}, "bad_record", True),
    ({"id": "bad_count", "image": "red.png", "conversations": turns(("no tag here", "x"))}, "image_count", True),
    ({"id": "bad_missing", "image": "nope.png", "conversations": turns(("", "x"), image=True)}, "image", False),
    ({"id": "bad_corrupt", "image": "corrupt.png", "conversations": turns(("", "x"), image=True)}, "image", False),
    ({"id": "bad_long", "image": "red.png", "conversations": turns(("", "x"), image=True), "huge": True},
     "too_long", False),
    ({"id": "bad_roles", "conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]},
     "template", False),
    ({"id": "bad_nolabel", "conversations": [{"from": "human", "value": "only a question"}]}, "no_labels", False),
]
HUGE = dict(image_seq_len=lambda s, k: 1000 if s.extra.get("huge") else SEQ)  # image tokens alone exceed MAX_LEN


@pytest.mark.parametrize("record,reason,at_init", BAD, ids=[b[0]["id"] for b in BAD])
def test_strict_error_names_sample_and_file(root, tok, record, reason, at_init):
    records = [GOOD[0], record]
    if at_init:
        with pytest.raises(DataError) as e:
            make(root, tok, records, **HUGE)
    else:
        ds = make(root, tok, records, **HUGE)
        with pytest.raises(DataError) as e:
            ds[1]
    assert e.value.reason == reason
    assert record["id"] in str(e.value) and "train.json" in str(e.value)


def test_too_long_message_counts_image_tokens(root, tok):
    ds = make(root, tok, [BAD[4][0]], **HUGE)
    with pytest.raises(DataError, match=r"1000 of them image tokens\) > model_max_length 256"):
        ds[0]


def test_malformed_json_is_an_error_naming_file_and_position(root, tok):
    (root / "broken.json").write_text('[{"id": "a",\n "conversations": ]')
    with pytest.raises(DataError, match=r"broken\.json:2:19: malformed JSON"):
        SupervisedDataset(root / "broken.json", root, tok, "vicuna_v1", ImageProcessor(image_size=16), 4, SEQ, MAX_LEN,
                          strict=False)


def test_non_strict_drops_bad_samples_and_never_replaces_them(root, tok, caplog):
    records = [GOOD[0]] + [b[0] for b in BAD] + [GOOD[1]]
    with caplog.at_level(logging.WARNING, logger="polyfocus.data.dataset"):
        ds = make(root, tok, records, name="mix.jsonl", strict=False, **HUGE)
        # The init-time failures are out of the index already.
        lazy = [b[0]["id"] for b in BAD if not b[2]]
        assert [s.id for s in ds.samples] == ["img1"] + lazy + ["txt1"]
        # A lazy failure is a Skipped marker (the collator drops it), never another sample in its place: a
        # replacement would train that other sample twice in the epoch.
        for _ in range(2):  # a second epoch meets them again: counted and warned once
            items = [ds[i] for i in range(len(ds))]
            assert [item["id"] for item in items if isinstance(item, dict)] == ["img1", "txt1"]
            assert [(m.reason, m.sample) for m in items if isinstance(m, Skipped)] == [
                (b[1], f"id {b[0]['id']!r}") for b in BAD if not b[2]]
    expected = {}
    for record, reason, _ in BAD:
        expected.setdefault(reason, []).append(f"id {record['id']!r}")
    assert dict(ds.skipped) == expected
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == len(BAD)  # one warning per skipped sample, never silent
    assert all("mix.jsonl" in w for w in warnings)


def test_collator_drops_skipped_samples_and_lists_them(root, tok):
    ds = make(root, tok, [GOOD[1], BAD[2][0], BAD[3][0]], strict=False)
    collate = DataCollator(tok.pad_token_id)
    batch = collate([ds[0], ds[1], ds[2]])
    assert batch["input_ids"].shape[0] == 1 and torch.equal(batch["input_ids"][0], ds[0]["input_ids"])
    where = str(root / "train.json")
    assert batch["skipped"] == [(where, "image", "id 'bad_missing'"), (where, "image", "id 'bad_corrupt'")]
    empty = collate([ds[1]])  # nothing left: zero rows, still reported
    assert empty["input_ids"].shape == (0, 0) and empty["skipped"] == [(where, "image", "id 'bad_missing'")]
    assert "skipped" not in collate([ds[0]])


TRUNCATED = {"id": "bad_truncated", "image": "truncated.png", "conversations": turns(("", "x"), image=True)}


def test_validate_finds_lazy_problems_up_front(root, tok):
    records = [GOOD[0]] + [b[0] for b in BAD if not b[2]] + [TRUNCATED, GOOD[1]]
    ds = make(root, tok, records, strict=False, **HUGE)
    ds.validate()  # each image's header: the missing and the corrupt one; the truncated one's header reads
    assert [s.id for s in ds.samples] == ["img1", "bad_truncated", "txt1"]
    ds.validate(images="decode")
    assert [s.id for s in ds.samples] == ["img1", "txt1"]
    assert len(ds.modality_lengths) == 2
    assert sorted(ds.skipped) == ["image", "no_labels", "template", "too_long"]
    assert len(ds.skipped["image"]) == 3

    strict = make(root, tok, records, **HUGE)
    with pytest.raises(DataError, match=r"train\.json: sample id 'bad_missing': image not found: .*nope\.png"):
        strict.validate()
    corrupt = make(root, tok, [GOOD[0], BAD[3][0]])  # a corrupt image stops a strict run before training
    with pytest.raises(DataError, match=r"sample id 'bad_corrupt': cannot read image .*corrupt\.png"):
        corrupt.validate()
    with pytest.raises(DataError, match=r"sample id 'bad_truncated': cannot read image .*truncated"):
        make(root, tok, [GOOD[0], TRUNCATED]).validate(images="decode")


def test_all_bad_is_an_error(root, tok):
    with pytest.raises(DataError, match="no usable samples"):
        make(root, tok, [BAD[0][0]], strict=False)
    ds = make(root, tok, [BAD[2][0]], strict=False)
    assert isinstance(ds[0], Skipped)  # found lazily: the collator and the trainer deal with an empty batch


def test_over_long_text_drops_whole_trailing_rounds(root, tok):
    image_id = tok.convert_tokens_to_ids("<image>")
    rounds = [("What is in the picture?", "A red square."), ("Is it big?", "No, it is small."),
              ("Anything else?", "Nothing else is in the picture at all.")]
    record = {"id": "long", "image": "red.png", "conversations": turns(*rounds, image=True)}
    messages = move_image_to_front(canonical(record))
    vicuna = get_template("vicuna_v1")
    two_rounds = encode(messages[:4], tok, vicuna, image_id, [SEQ])
    ds = make(root, tok, [record], model_max_length=len(two_rounds.input_ids))
    item = ds[0]
    assert item["input_ids"].tolist() == two_rounds.input_ids and item["labels"].tolist() == two_rounds.labels
    assert ds.trimmed == {"id 'long'"}
    # The first round (with the image) is never dropped: below its length the sample is refused.
    one_round = encode(messages[:2], tok, vicuna, image_id, [SEQ])
    ds = make(root, tok, [record], model_max_length=len(one_round.input_ids) - 1)
    with pytest.raises(DataError, match="no trailing text-only round can be dropped") as e:
        ds[0]
    assert e.value.reason == "too_long"


# ---- collator ------------------------------------------------------------------------------------------------

PAD = 3


def feature(ids, labels, n_images, sid):
    pix = None if n_images is None else torch.full((n_images, 3, 2, 2), float(sid))
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "pixel_values": pix, "id": sid}


FEATURES = [
    feature([1, 9, 9, 5], [-100, -100, 9, 5], 1, 1),
    feature([1, PAD], [-100, PAD], None, 2),  # a real token equal to the pad id must stay attended
    feature([1, 9, 9, 9, 9, 5], [-100, -100, -100, -100, 9, 5], 2, 3),
]


def test_collator_right_padding_exact():
    batch = DataCollator(pad_token_id=PAD)(FEATURES)
    assert batch["input_ids"].tolist() == [[1, 9, 9, 5, PAD, PAD], [1, PAD, PAD, PAD, PAD, PAD], [1, 9, 9, 9, 9, 5]]
    assert batch["labels"].tolist() == [
        [-100, -100, 9, 5, -100, -100], [-100, PAD, -100, -100, -100, -100], [-100, -100, -100, -100, 9, 5]
    ]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]]
    # All images in sample order: sample 1's one, then sample 3's two.
    assert batch["pixel_values"].shape == (3, 3, 2, 2)
    assert batch["pixel_values"][:, 0, 0, 0].tolist() == [1.0, 3.0, 3.0]


def test_collator_left_padding_exact():
    batch = DataCollator(pad_token_id=PAD, padding_side="left")(FEATURES)
    assert batch["input_ids"].tolist() == [[PAD, PAD, 1, 9, 9, 5], [PAD, PAD, PAD, PAD, 1, PAD], [1, 9, 9, 9, 9, 5]]
    assert batch["labels"].tolist() == [
        [-100, -100, -100, -100, 9, 5], [-100, -100, -100, -100, -100, PAD], [-100, -100, -100, -100, 9, 5]
    ]
    assert batch["attention_mask"].tolist() == [[0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1], [1, 1, 1, 1, 1, 1]]


def test_collator_text_only_and_inference_batches():
    batch = DataCollator(pad_token_id=PAD)([FEATURES[1]])
    assert batch["pixel_values"] is None
    no_labels = [{k: v for k, v in f.items() if k != "labels"} for f in FEATURES]
    assert "labels" not in DataCollator(pad_token_id=PAD, padding_side="left")(no_labels)


def test_collator_refuses_to_cut():
    with pytest.raises(ValueError, match="sample 3 has 6 tokens > model_max_length 5"):
        DataCollator(pad_token_id=PAD, model_max_length=5)(FEATURES)


def test_dataset_collator_end_to_end(root, tok):
    ds = make(root, tok, GOOD)
    batch = DataCollator(tok.pad_token_id, model_max_length=MAX_LEN)([ds[i] for i in range(len(ds))])
    image_id = tok.convert_tokens_to_ids("<image>")
    # As many image-token runs as images: the model can scatter features in order.
    assert (batch["input_ids"] == image_id).sum() == SEQ * batch["pixel_values"].shape[0] == SEQ * 3
    assert (batch["labels"][batch["input_ids"] == image_id] == IGNORE_INDEX).all()


# ---- sampler -------------------------------------------------------------------------------------------------


def test_split_to_even_chunks_hand_example():
    lengths = [10, 9, 5, 4, 3, 1]
    # greedy on sorted indices: 0->A(10), 1->B(9), 2->B(14), 3->A(14), 4->A(17, full), 5->B(15, full)
    assert split_to_even_chunks([0, 1, 2, 3, 4, 5], lengths, 2) == [[0, 3, 4], [1, 2, 5]]
    assert split_to_even_chunks([0, 1, 2, 3, 4], lengths, 2) == [[0, 2, 4], [1, 3]]  # uneven: round robin


def random_lengths(n_mm, n_text, seed):
    g = torch.Generator().manual_seed(seed)
    mm = (torch.randint(1, 500, (n_mm,), generator=g)).tolist()
    text = (-torch.randint(1, 500, (n_text,), generator=g)).tolist()
    perm = torch.randperm(n_mm + n_text, generator=g).tolist()
    both = mm + text
    return [both[p] for p in perm]


# (48, 24, 4, 3): both modalities divide into megabatches, so there is no tail (LLaVA's code would still mix two).
@pytest.mark.parametrize(
    "n_mm,n_text,batch_size,world", [(50, 23, 2, 3), (48, 24, 4, 3), (7, 30, 2, 2), (64, 0, 4, 2), (0, 9, 2, 2)]
)
def test_modality_sampler_invariants(n_mm, n_text, batch_size, world):
    lengths = random_lengths(n_mm, n_text, seed=n_mm * 31 + n_text)
    mega = batch_size * world
    order = modality_length_grouped_indices(lengths, batch_size, world, torch.Generator().manual_seed(0))
    assert sorted(order) == list(range(len(lengths)))  # a permutation of all indices
    assert order == modality_length_grouped_indices(lengths, batch_size, world, torch.Generator().manual_seed(0))
    assert order != modality_length_grouped_indices(lengths, batch_size, world, torch.Generator().manual_seed(1))

    # Everything before the tail is whole single-modality megabatches; the tail is the two remainders.
    tail = (n_mm % mega + n_text % mega) if n_mm and n_text else len(lengths) % mega
    head = order[: len(order) - tail]
    for start in range(0, len(head), mega):
        batch = head[start : start + mega]
        assert len(batch) == mega and len({lengths[i] > 0 for i in batch}) == 1
        # Chunks (one per device) are equal in count, their total lengths within one sample of each other,
        # and each megabatch is dealt from longest to shortest.
        chunks = [batch[c * batch_size : (c + 1) * batch_size] for c in range(world)]
        sums = [sum(abs(lengths[i]) for i in c) for c in chunks]
        assert max(sums) - min(sums) <= max(abs(lengths[i]) for i in batch)
        assert all(abs(lengths[c[0]]) >= abs(lengths[c[-1]]) for c in chunks)
    # So every global batch but the tail's (at most two, as the tail is < 2 megabatches) has one modality.
    assert tail < 2 * mega


def test_modality_sampler_mixes_megabatch_order():
    lengths = [5] * 40 + [-5] * 40
    order = modality_length_grouped_indices(lengths, 2, 2, torch.Generator().manual_seed(0))
    kinds = [lengths[order[s]] > 0 for s in range(0, 80, 4)]
    assert 0 < sum(kinds) < 20 and kinds != sorted(kinds) and kinds != sorted(kinds, reverse=True)


def test_modality_sampler_rejects_zero_length():
    with pytest.raises(ValueError, match="non-zero"):
        modality_length_grouped_indices([3, 0, -2], 1, 1)


def test_length_grouped_sampler_epochs():
    lengths = random_lengths(30, 10, seed=3)
    sampler = LengthGroupedSampler(lengths, batch_size=2, world_size=2, seed=7)
    first = list(sampler)
    assert len(sampler) == 40 and sorted(first) == list(range(40))
    assert list(sampler) == first  # same epoch -> same order (resume, every rank)
    sampler.set_epoch(1)
    assert list(sampler) != first
    assert list(LengthGroupedSampler(lengths, 2, 2, seed=7)) == first
