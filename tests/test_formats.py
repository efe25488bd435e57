import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from polyfocus.data.formats import (
    DataError, Sample, convert_file, load_samples, sample_from_record, save_samples, to_llava, to_messages,
)


def human(value):
    return {"from": "human", "value": value}


def gpt(value):
    return {"from": "gpt", "value": value}


RESERVED = {"id", "image", "conversations", "messages", "images", "llava_image_list"}

json_scalar = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text()
json_value = st.recursive(
    json_scalar, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3), max_leaves=8
)
turn = st.fixed_dictionaries(
    {"from": st.sampled_from(["human", "gpt", "system"]), "value": st.text()},
    optional={"weight": json_value, "loss": st.booleans()},
)
llava_record = st.fixed_dictionaries(
    {"conversations": st.lists(turn, min_size=1, max_size=5)},
    optional={
        "id": st.text() | st.integers(),
        "image": st.text() | st.lists(st.text(), max_size=3),
        "family": st.text(),
        "boxes": st.lists(st.lists(st.floats(0, 1), min_size=4, max_size=4), max_size=3),
    },
).flatmap(
    lambda rec: st.dictionaries(st.text().filter(lambda k: k not in RESERVED | set(rec)), json_value, max_size=3).map(
        lambda more: {**rec, **more}
    )
)


@settings(max_examples=100, deadline=None)
@given(llava_record)
def test_llava_messages_llava_round_trip_is_exact(record):
    sample = sample_from_record(record)
    messages = to_messages(sample)
    assert to_llava(sample_from_record(messages)) == record
    assert sample_from_record(messages) == sample


def test_file_round_trip_through_json_and_jsonl(tmp_path):
    records = [
        {"id": "a", "image": "coco/1.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A cat\u2028 (U+2028 inside)."}
        ], "family": "colour", "boxes": [[0.1, 0.2, 0.3, 0.4]]},
        {"id": 7, "image": ["x.png"], "conversations": [human("<image>hi"), gpt("ok")]},
        {"id": "two", "image": ["x.png", "y.png"], "conversations": [
            {"from": "human", "value": "<image><image>diff?"}, {"from": "gpt", "value": "none", "weight": 0}
        ]},
        {"id": "text-only", "conversations": [
            {"from": "system", "value": "Be brief."}, human("hi"), gpt("hello")
        ]},
    ]
    src = tmp_path / "llava.json"
    src.write_text(json.dumps(records))
    assert convert_file(src, tmp_path / "msgs.jsonl", to="messages") == 4
    lines = (tmp_path / "msgs.jsonl").read_text(encoding="utf-8").rstrip("\n").split("\n")
    first = json.loads(lines[0])
    assert first["messages"][0] == {"role": "user", "content": "<image>\nWhat is it?"}
    assert first["images"] == ["coco/1.jpg"] and first["family"] == "colour"
    convert_file(tmp_path / "msgs.jsonl", tmp_path / "back.json", to="llava")
    assert json.loads((tmp_path / "back.json").read_text(encoding="utf-8")) == records


def test_reads_llama_factory_messages():
    sample = sample_from_record({
        "messages": [{"role": "user", "content": "<image>Who?"}, {"role": "assistant", "content": "Bob"}],
        "images": ["p/1.jpg"],
    })
    messages = [{"role": "user", "content": "<image>Who?"}, {"role": "assistant", "content": "Bob"}]
    assert sample == Sample(None, messages, ["p/1.jpg"])
    assert to_llava(sample) == {
        "image": "p/1.jpg",
        "conversations": [{"from": "human", "value": "<image>Who?"}, {"from": "gpt", "value": "Bob"}],
    }


def test_malformed_json_list_names_file_line_and_column(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"id": "a", "conversations": []},\n  {"id": "b",, }\n]')
    with pytest.raises(DataError, match=r"bad\.json:3:14: malformed JSON") as e:
        load_samples(path)
    assert e.value.reason == "malformed_json"
    # A broken JSON list cannot be resynchronised: it raises even when the caller collects errors.
    with pytest.raises(DataError):
        load_samples(path, on_error=lambda e: None)


def test_malformed_jsonl_line_names_line_and_can_be_collected(tmp_path):
    good = {"id": "a", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(good) + "\n{oops\n\n" + json.dumps({**good, "id": "c"}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: malformed JSON line"):
        load_samples(path)
    errors = []
    samples = load_samples(path, on_error=errors.append)
    assert [s.id for s in samples] == ["a", "c"]
    assert [(e.reason, e.sample) for e in errors] == [("malformed_json", "line 2")]


def test_top_level_object_is_explained(tmp_path):
    path = tmp_path / "obj.json"
    path.write_text('{\n "data": []\n}')
    with pytest.raises(DataError, match="top-level JSON object"):
        load_samples(path)


@pytest.mark.parametrize(
    "record, pattern",
    [
        ({"id": "s1", "image": "a.jpg"}, r"train\.json: sample id 's1': no 'conversations'"),
        ({"id": "s2", "conversations": [{"from": "bot", "value": "x"}]}, r"train\.json: sample id 's2': turn 0 .*'bot'"),
        ({"id": "s3", "messages": [{"role": "human", "content": "x"}]}, r"train\.json: sample id 's3': turn 0 .*'human'"),
        ({"id": "s4", "conversations": [human(3)]}, r"sample id 's4': turn 0 'value' must be a string"),
        ({"id": "s5", "conversations": []}, r"sample id 's5': conversation must be a non-empty list"),
        ({"id": "s6", "image": 5, "conversations": [human("x")]}, r"sample id 's6': 'image' must be"),
        ({"conversations": [{**gpt("x"), "role": "user"}]}, r"train\.json: sample record #1: turn 0 mixes"),
    ],
)
def test_bad_record_names_sample_and_file(tmp_path, record, pattern):
    good = {"id": "ok", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}
    path = tmp_path / "train.json"
    path.write_text(json.dumps([good, record]))
    with pytest.raises(DataError, match=pattern) as e:
        load_samples(path)
    assert e.value.reason == "bad_record"
    errors = []
    assert [s.id for s in load_samples(path, on_error=errors.append)] == ["ok"]
    assert len(errors) == 1


def test_id_less_jsonl_record_is_named_by_line(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"conversations": [{"from": "human", "value": "x"}]}\n{"messages": "nope"}\n')
    with pytest.raises(DataError, match=r"t\.jsonl: sample line 2: conversation must be a non-empty list"):
        load_samples(path)


def test_field_clash_is_an_error_not_an_overwrite(tmp_path):
    sample = sample_from_record({"id": "x", "images": ["i.jpg"], "conversations": [{"from": "human", "value": "q"}]})
    with pytest.raises(DataError, match=r"sample id 'x'.*\['images'\]"):
        to_messages(sample)
    assert to_llava(sample)["images"] == ["i.jpg"]  # kept verbatim as an extra field in the LLaVA output


def test_save_samples_rejects_unknown_format(tmp_path):
    with pytest.raises(ValueError, match="llava"):
        save_samples([], tmp_path / "x.json", to="sharegpt")


def test_empty_file_has_no_samples(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n")
    assert load_samples(tmp_path / "e.jsonl") == []
