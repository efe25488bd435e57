"""Every benchmark loader end to end, on a few-row fixture in its real file format written here: once with the tiny
model (all outputs made), once with scripted answers whose scores are computed by hand. The GPT-judged benchmarks
talk to a fake OpenAI-compatible endpoint on loopback."""

import base64
import datetime
import io
import json
import pickle

import pytest
from openpyxl import load_workbook
from PIL import Image

from polyfocus.data.files import sha256_file
from polyfocus.eval.benchmarks import BENCHMARKS, EvalDataError, get_benchmark
from polyfocus.eval.benchmarks.judged import MMVET_RETRY
from polyfocus.eval.judge import Judge, JudgeError
from polyfocus.eval.runner import evaluate
from polyfocus.infer.pipeline import Pipeline
from polyfocus.synthworld.scenes import export

from eval_helpers import FakeOpenAI, Scripted, png, read_jsonl, save_tiny_checkpoint, write_json, write_jsonl

SA = "\nAnswer the question using a single word or phrase."
MC = "\nAnswer with the option's letter from the given choices directly."

# ----------------------------------------------------------------------------- fixtures in the real formats


def make_vqav2(root):
    d = root / "vqav2"
    texts = {101: "Is it red?", 102: "How many cats are there?" + SA, 103: "What color is it?"}
    write_jsonl(d / "llava_vqav2_mscoco_test-dev2015.jsonl",
                [{"question_id": q, "image": f"COCO_test2015_{q:012d}.jpg", "text": t, "category": "default"}
                 for q, t in texts.items()])
    write_jsonl(d / "llava_vqav2_mscoco_test2015.jsonl",
                [{"question_id": q, "image": f"COCO_test2015_{q:012d}.jpg", "text": "q"} for q in (101, 102, 103, 104)])
    for q in texts:
        png(d / "test2015" / f"COCO_test2015_{q:012d}.jpg")
    answers = {101: ["yes"] * 10, 102: ["2", "2"] + ["3"] * 8, 103: ["red"] * 10}
    write_json(d / "v2_annotations.json", {"annotations": [
        {"question_id": q, "answer_type": "other",
         "answers": [{"answer": a, "answer_id": i + 1} for i, a in enumerate(v)]}
        for q, v in answers.items()]})
    return d


def make_gqa(root):
    d = root / "gqa"
    lines = [("201", "n1.jpg", "Is the sky blue?"), ("202", "n2.jpg", "What animal is this?"),
             ("203", "n1.jpg", "Which side is the cup on?")]
    write_jsonl(d / "llava_gqa_testdev_balanced.jsonl",
                [{"question_id": q, "image": i, "text": t + SA} for q, i, t in lines])
    write_jsonl(d / "llava_gqa_testdev_balanced_mcq.jsonl", [
        {"question_id": "202", "image": "n2.jpg", "question": "What animal is this?\nA. cat\nB. dog\nC. horse\nD. cow"},
        {"question_id": "203", "image": "n1.jpg",
         "question": "Which side is the cup on?\nA. left\nB. right\nC. top\nD. bottom"}])
    for name in ("n1.jpg", "n2.jpg"):
        png(d / "data" / "images" / name)
    write_json(d / "data" / "testdev_balanced_questions.json", {
        "201": {"answer": "yes", "isBalanced": True, "types": {"structural": "verify", "semantic": "attr"}},
        "202": {"answer": "dog", "isBalanced": True, "types": {"structural": "query", "semantic": "cat"}},
        "203": {"answer": "left", "isBalanced": True, "types": {"structural": "query", "semantic": "rel"}}})
    return d


def make_vizwiz(root):
    d = root / "vizwiz"
    write_jsonl(d / "llava_test.jsonl", [
        {"question_id": 0, "image": "VizWiz_test_00000000.jpg", "text": "What is this?"},
        {"question_id": 1, "image": "VizWiz_test_00000001.jpg", "text": "What drink is it?"}])
    png(d / "test" / "VizWiz_test_00000000.jpg")
    png(d / "test" / "VizWiz_test_00000001.jpg")
    write_json(d / "val.json", [
        {"image": "VizWiz_test_00000000.jpg", "answers": [{"answer": "unanswerable"}] * 10},
        {"image": "VizWiz_test_00000001.jpg", "answers": [{"answer": "coffee"}] * 3 + [{"answer": "tea"}] * 7}])
    return d


def make_textvqa(root):
    d = root / "textvqa"
    ocr = "\nReference OCR token: Nike, shoe"
    write_jsonl(d / "llava_textvqa_val_v051_ocr.jsonl", [  # question_id is the image id (LLaVA's quirk): repeated
        {"question_id": "imgA", "image": "imgA.jpg", "text": "what brand is this?" + ocr + SA},
        {"question_id": "imgA", "image": "imgA.jpg", "text": "what color is the logo?" + ocr + SA}])
    png(d / "train_images" / "imgA.jpg")
    write_json(d / "TextVQA_0.5.1_val.json", {"data": [
        {"image_id": "imgA", "question": "What brand is this?", "question_id": 7,
         "answers": ["nike"] * 8 + ["adidas"] * 2},
        {"image_id": "imgA", "question": "What color is the logo?", "question_id": 8, "answers": ["white"] * 10}]})
    return d


def make_pope(root):
    d = root / "pope"
    questions = [(1, "random", "dog"), (2, "random", "car"), (3, "adversarial", "cat"), (4, "adversarial", "bird")]
    write_jsonl(d / "llava_pope_test.jsonl", [
        {"question_id": q, "image": f"COCO_val2014_{q:012d}.jpg", "text": f"Is there a {o} in the image?" + SA,
         "category": c} for q, c, o in questions])
    labels = {"random": [("dog", "yes"), ("car", "no")], "adversarial": [("cat", "no"), ("bird", "yes")]}
    for category, items in labels.items():
        first = 1 if category == "random" else 3
        write_jsonl(d / "coco" / f"coco_pope_{category}.json", [
            {"question_id": i + 1, "image": f"COCO_val2014_{first + i:012d}.jpg",
             "text": f"Is there a {o} in the image?", "label": label} for i, (o, label) in enumerate(items)])
    for q, _, _ in questions:
        png(d / "val2014" / f"COCO_val2014_{q:012d}.jpg")
    return d


def make_mme(root):
    d = root / "MME"
    release = d / "MME_Benchmark_release_version"

    def task(name, image, lines, split_dirs=False):
        images = release / name / "images" if split_dirs else release / name
        questions = release / name / "questions_answer_YN" if split_dirs else release / name
        png(images / image)
        questions.mkdir(parents=True, exist_ok=True)
        (questions / (image.rsplit(".", 1)[0] + ".txt")).write_text(
            "".join(f"{q} Please answer yes or no.\t{a}\n" for q, a in lines))

    task("existence", "0001.jpg", [("Is there a dog in this image?", "Yes"), ("Is there a cat in this image?", "No")])
    task("existence", "0002.png", [("Is there a car in this image?", "No"), ("Is there a tree in this image?", "Yes")])
    task("artwork", "10.jpg", [("Is this by Monet?", "Yes"), ("Is this by Picasso?", "No")], split_dirs=True)
    task("code_reasoning", "0020.png", [("Does this code print 5?", "Yes"), ("Does this code print 6?", "No")])
    return d


def make_scienceqa(root):
    d = root / "scienceqa"
    items = [("10", True, "Context: A photo.\nWhich animal is shown?\nA. cat\nB. dog"),
             ("11", False, "Context: N/A\nWhich is a liquid?\nA. water\nB. rock\nC. wood"),
             ("12", True, "Context: A sign.\nWhich color is it?\nA. red\nB. blue")]
    write_json(d / "llava_test_CQM-A.json", [
        {"id": i, **({"image": f"{i}/image.png"} if img else {}),
         "conversations": [{"from": "human", "value": ("<image>\n" if img else "") + text},
                           {"from": "gpt", "value": "A"}]}
        for i, img, text in items])
    write_json(d / "problems.json", {"10": {"answer": 0, "choices": ["cat", "dog"]},
                                     "11": {"answer": 0, "choices": ["water", "rock", "wood"]},
                                     "12": {"answer": 1, "choices": ["red", "blue"]}})
    write_json(d / "pid_splits.json", {"test": ["10", "11", "12"]})
    png(d / "images" / "test" / "10" / "image.png")
    png(d / "images" / "test" / "12" / "image.png")
    return d


def b64_png(colour=(10, 200, 10)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (32, 24), colour).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


MMB_COLUMNS = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source", "l2-category",
               "comment", "split"]


def make_mmbench(root, name="mmbench", question_suffix=""):
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    rows = [[0, "What animal?" + question_suffix, "nan", "cat", "dog", "", "", "B", "animals", b64_png(), "s", "l2a", "",
             "dev"],
            [1, "What time?", "A photo taken at noon.", "morning", "noon", "night", "None", "B", "time", b64_png(), "s",
             "l2b", "", "dev"],
            [2, "Which shape?", "nan", "circle", "square", "triangle", "star", "D", "shapes", b64_png(), "s", "l2a", "",
             "dev"]]
    tsv = "mmbench_dev_20230712.tsv" if name == "mmbench" else "mmbench_dev_cn_20231003.tsv"
    (d / tsv).write_text("\t".join(MMB_COLUMNS) + "\n" + "".join("\t".join(map(str, r)) + "\n" for r in rows))
    return d


def make_seed(root):
    d = root / "seed_bench"
    question = {"question": "How many apples?", "choice_a": "1", "choice_b": "2", "choice_c": "3", "choice_d": "4"}
    write_json(d / "SEED-Bench.json", {"question_type": {"Scene Understanding": 1, "Instances Counting": 5}, "questions": [
        {**question, "question_id": "q1", "data_id": "a.jpg", "data_type": "image", "answer": "B",
         "question_type_id": 5},
        {**question, "question": "Where is it?", "question_id": "q2", "data_id": "b.jpg", "data_type": "image",
         "answer": "A", "question_type_id": 1},
        {**question, "question_id": "q3", "data_id": "v.mp4", "data_type": "video", "answer": "A",
         "question_type_id": 10}]})
    png(d / "SEED-Bench-image" / "a.jpg")
    png(d / "SEED-Bench-image" / "b.jpg")
    return d


def make_mmvet(root):
    d = root / "mm-vet"
    write_json(d / "mm-vet.json", {
        "v1_0": {"imagename": "v1_0.png", "capability": ["rec", "know"], "question": "What is this?",
                 "answer": "a cat<OR>kitten"},
        "v1_1": {"imagename": "v1_1.png", "capability": ["ocr", "math"], "question": "What is 2+2?", "answer": "4"}})
    png(d / "images" / "v1_0.png")
    png(d / "images" / "v1_1.png")
    return d


def make_llava_bench(root):
    d = root / "llava-bench-in-the-wild"
    write_jsonl(d / "questions.jsonl", [
        {"question_id": 0, "image": "001.jpg", "text": "Describe it.", "category": "detail"},
        {"question_id": 1, "image": "001.jpg", "text": "What is it?", "category": "conv"}])
    write_jsonl(d / "context.jsonl", [{"id": "001", "image": "001.jpg", "caption": "A red square."}])
    write_jsonl(d / "answers_gpt4.jsonl", [{"question_id": 0, "text": "A red square on white."},
                                           {"question_id": 1, "text": "A square."}])
    png(d / "images" / "001.jpg")
    return d


def make_refcoco(root):
    d = root / "refcoco"
    refs = [{"ref_id": 0, "ann_id": 10, "image_id": 1, "split": "val", "category_id": 18,
             "sentences": [{"sent_id": 100, "sent": "left dog"}, {"sent_id": 101, "sent": "the dog on the left"}]},
            {"ref_id": 1, "ann_id": 11, "image_id": 1, "split": "testA",
             "sentences": [{"sent_id": 102, "sent": "cat"}]},
            {"ref_id": 2, "ann_id": 11, "image_id": 1, "split": "test", "sentences": [{"sent_id": 103, "sent": "cat"}]}]
    d.mkdir(parents=True, exist_ok=True)
    for name in ("refs(unc).p", "refs(umd).p"):
        (d / name).write_bytes(pickle.dumps(refs, protocol=2))
    write_json(d / "instances.json", {
        "images": [{"id": 1, "file_name": "COCO_train2014_000000000001.jpg", "width": 200, "height": 100}],
        "annotations": [{"id": 10, "image_id": 1, "bbox": [50, 0, 100, 100]},
                        {"id": 11, "image_id": 1, "bbox": [150, 10, 40, 40]}]})
    png(d / "train2014" / "COCO_train2014_000000000001.jpg", size=(200, 100))
    return d


def make_mmmu(root):
    d = root / "mmmu"
    write_jsonl(d / "mmmu_validation.jsonl", [
        {"id": "validation_Art_1", "question": "What is in <image 1>?", "options": "['a cat', 'a dog', 'a bird']",
         "answer": "B", "question_type": "multiple-choice", "image_1": "images/art1.png"},
        {"id": "validation_Math_2", "question": "Compare <image 2> and <image 1>. What is 6 times 7?", "options": "[]",
         "answer": "42", "question_type": "open", "image_1": "images/m1.png", "image_2": "images/m2.png"}])
    for name in ("art1.png", "m1.png", "m2.png"):
        png(d / "images" / name)
    return d


def make_synthworld(root):
    d = root / "synthworld"
    export(str(d), 2, seed=5, image_size=56, split="test", families=["colour", "mc", "grounding"])
    return d


MAKERS = {"vqav2": make_vqav2, "gqa": make_gqa, "gqa_mcq": make_gqa, "vizwiz": make_vizwiz, "scienceqa": make_scienceqa,
          "textvqa": make_textvqa, "textvqa_no_ocr": make_textvqa, "pope": make_pope, "mme": make_mme,
          "mmbench": make_mmbench, "mmbench_cn": lambda r: make_mmbench(r, "mmbench_cn", "（中文）"),
          "seed_bench": make_seed, "mmvet": make_mmvet, "llava_bench": make_llava_bench, "refcoco": make_refcoco,
          "refcoco+": make_refcoco, "refcocog": make_refcoco, "mmmu": make_mmmu, "synthworld": make_synthworld}


def judge_reply(body):
    """The fake judge: MM-Vet grades by the prediction (the last table line), LLaVA-Bench by Assistant 2's answer."""
    text = body["messages"][-1]["content"]
    if text.startswith("Compare the ground truth"):
        if text.endswith(MMVET_RETRY):
            return "0.5"
        return "1.0" if "kitten" in text.rsplit("\n", 1)[-1] else "Correct"
    return "9 8\nGood." if "[Assistant 2]\ngood" in text else "8 4\nShort."


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("bench_data")


@pytest.fixture(scope="module")
def fake_openai():
    server = FakeOpenAI(judge_reply)
    yield server
    server.close()


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return Pipeline.from_pretrained(save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt")), device="cpu")


def scripted_run(tmp_path, name, data, answers, fake=None, **options):
    model = Scripted(answers)
    judge = {"base_url": fake.url, "api_key": "sk-test"} if fake else None
    results = evaluate(model, name, data, out=tmp_path, batch_size=2, options=options, judge=judge, quiet=True)
    assert not model.answers, "every scripted answer was used"
    return results, model.requests


def sent_prompts(tmp_path, name):
    return [s["prompt"] for s in read_jsonl(tmp_path / name / "samples.jsonl")]


# ----------------------------------------------------------------------------- the tiny model through every loader


@pytest.mark.parametrize("name", list(BENCHMARKS))
def test_every_benchmark_runs_end_to_end_on_the_tiny_model(name, root, pipe, fake_openai, tmp_path):
    data = MAKERS[name](root / name)
    rows = get_benchmark(name, data).load()
    results = evaluate(pipe, name, data, out=tmp_path, batch_size=4, max_new_tokens=3, quiet=True,
                       judge={"base_url": fake_openai.url, "api_key": "sk-test"})
    out = tmp_path / name
    answers, samples = read_jsonl(out / "answers.jsonl"), read_jsonl(out / "samples.jsonl")
    assert results["n"] == len(rows) == len(answers) == len(samples) > 0
    assert [a["question_id"] for a in answers] == [r.question_id for r in rows]
    assert all(isinstance(s["answer"], str) and "score" in s for s in samples)
    assert results["main_metric"] in results["scores"] and json.loads((out / "results.json").read_text()) == results
    for path, digest in results["files_sha256"].items():  # every file that was read is hashed, correctly
        assert "(combined)" in path or digest == sha256_file(path)
    for path in results.get("submission", []):
        assert (out / "submission").exists() and path.startswith(str(out / "submission"))


# ----------------------------------------------------------------------------- hand-computed scores per benchmark


def test_vqav2_prompt_scores_and_evalai_upload(root, tmp_path):
    data = make_vqav2(root / "s_vqav2")
    results, requests = scripted_run(tmp_path, "vqav2", data, ["Yes", "two", "blue"],
                                     annotation_file="v2_annotations.json")
    prompts = sent_prompts(tmp_path, "vqav2")
    assert prompts[0] == "<image>\nIs it red?" + SA
    assert prompts[1] == "<image>\nHow many cats are there?" + SA  # the suffix is not doubled
    assert [len(images) for images, _ in requests] == [1, 1, 1]
    # 10x "yes" -> 1; "two" -> "2", 2 of 10 annotators -> 0.6; "blue" vs red -> 0
    assert results["scores"]["accuracy"] == pytest.approx(160 / 3)
    upload = json.loads((tmp_path / "vqav2" / "submission" / "llava_vqav2_mscoco_test-dev2015_upload.json").read_text())
    assert upload == [{"question_id": 101, "answer": "yes"}, {"question_id": 102, "answer": "2"},
                      {"question_id": 103, "answer": "blue"}, {"question_id": 104, "answer": ""}]


def test_vqav2_scores_by_the_current_official_rules_and_records_them(root, tmp_path):
    from polyfocus.eval.vqa_eval import VQA_RULES

    data = make_vqav2(root / "s_vqav2_rules")
    answers = {101: ["yes"] * 10, 102: ["two"] * 8 + ["2"] * 2, 103: ["the dog"] * 9 + ["dog"]}
    write_json(data / "v2_current.json", {"annotations": [
        {"question_id": q, "answer_type": "other", "answers": [{"answer": a, "answer_id": i + 1} for i, a in enumerate(v)]}
        for q, v in answers.items()]})
    results, _ = scripted_run(tmp_path, "vqav2", data, ["Yes", "two", "dog"], annotation_file="v2_current.json")
    assert results["scores"]["accuracy"] == 100.0  # vqaEval.py before its 2021 fix: (1 + 0.6 + 0.3) / 3
    assert results["scores"]["rules"] == VQA_RULES


def test_vqav2_without_annotations_has_no_score_but_the_upload(root, tmp_path):
    results, _ = scripted_run(tmp_path, "vqav2", make_vqav2(root / "s_vqav2b"), ["yes", "2", "red"])
    assert results["main"] is None and len(results["submission"]) == 1


def test_gqa_official_accuracy_and_prediction_file(root, tmp_path):
    results, _ = scripted_run(tmp_path, "gqa", make_gqa(root / "s_gqa"), ["Yes.", "Dog", "right"])
    scores = results["scores"]
    assert scores["accuracy"] == pytest.approx(200 / 3)
    assert scores["binary"] == 100.0 and scores["open"] == 50.0
    assert scores["per_semantic_type"] == {"attr": 100.0, "cat": 100.0, "rel": 0.0}
    predictions = json.loads((tmp_path / "gqa" / "submission" / "testdev_balanced_predictions.json").read_text())
    assert predictions[:2] == [{"questionId": "201", "prediction": "yes"}, {"questionId": "202", "prediction": "dog"}]


def test_gqa_mcq_maps_the_letter_to_the_option_text(root, tmp_path):
    results, _ = scripted_run(tmp_path, "gqa_mcq", make_gqa(root / "s_gqamcq"), ["B", "The right one"])
    assert sent_prompts(tmp_path, "gqa_mcq")[0] == ("<image>\nWhat animal is this?\nA. cat\nB. dog\nC. horse\n"
                                                    "D. cow" + MC)
    samples = read_jsonl(tmp_path / "gqa_mcq" / "samples.jsonl")
    assert [s["prediction"] for s in samples] == ["dog", "right"]
    assert results["scores"]["accuracy"] == 50.0


def test_gqa_mcq_answer_given_as_a_letter_is_its_option_text(root, tmp_path):
    d = make_gqa(root / "s_gqamcq_letter")
    write_jsonl(d / "llava_gqa_testdev_balanced_mcq.jsonl", [
        {"question_id": "x1", "image": "n2.jpg", "question": "What animal is this?\nA. cat\nB. dog", "answer": "B"}])
    rows = get_benchmark("gqa_mcq", d).load()
    assert rows[0].reference == "dog"
    results, _ = scripted_run(tmp_path, "gqa_mcq", d, ["B"])
    assert results["scores"]["accuracy"] == 100.0


def test_vizwiz_prompt_upload_and_val_score(root, tmp_path):
    results, _ = scripted_run(tmp_path, "vizwiz", make_vizwiz(root / "s_vizwiz"), ["Unanswerable", "coffee"],
                              annotation_file="val.json")
    assert sent_prompts(tmp_path, "vizwiz")[0] == ("<image>\nWhat is this?\nWhen the provided information is "
                                                   "insufficient, respond with 'Unanswerable'." + SA)
    assert results["scores"]["accuracy"] == pytest.approx(95.0)  # 1.0 and 3-of-10 -> 0.9
    upload = json.loads((tmp_path / "vizwiz" / "submission" / "vizwiz_test_upload.json").read_text())
    assert upload[0] == {"image": "VizWiz_test_00000000.jpg", "answer": "unanswerable"}


@pytest.mark.parametrize("name, second_line", [("textvqa", "Reference OCR token: Nike, shoe"),
                                               ("textvqa_no_ocr", SA.strip())])
def test_textvqa_with_and_without_ocr_tokens(root, tmp_path, name, second_line):
    results, _ = scripted_run(tmp_path, name, make_textvqa(root / f"s_{name}"), ["Nike", "black"])
    prompt = sent_prompts(tmp_path, name)[0]
    assert prompt.split("\n")[:3] == ["<image>", "what brand is this?", second_line]
    assert results["scores"]["accuracy"] == 50.0  # "nike" by 8 of 10 -> 1; "black" -> 0
    # the repeated image id of LLaVA's file is replaced by TextVQA's own question ids
    assert [s["question_id"] for s in read_jsonl(tmp_path / name / "samples.jsonl")] == [7, 8]


def test_textvqa_same_question_twice_on_an_image(root, tmp_path):
    d = make_textvqa(root / "s_textvqa_dup")
    ocr = "\nReference OCR token: Nike, shoe"
    lines = read_jsonl(d / "llava_textvqa_val_v051_ocr.jsonl")
    write_jsonl(d / "llava_textvqa_val_v051_ocr.jsonl",
                lines + [{"question_id": "imgA", "image": "imgA.jpg", "text": "What brand is this?" + ocr + SA}])
    data = json.loads((d / "TextVQA_0.5.1_val.json").read_text())
    data["data"].append({"image_id": "imgA", "question": "what brand is this?", "question_id": 9,
                         "answers": ["puma"] * 10})
    write_json(d / "TextVQA_0.5.1_val.json", data)
    results, _ = scripted_run(tmp_path, "textvqa", d, ["puma", "white", "puma"])
    # unique ids, one per annotation; both rows are scored against the last one, as eval_textvqa.py's dict does
    assert [s["question_id"] for s in read_jsonl(tmp_path / "textvqa" / "samples.jsonl")] == [7, 8, 9]
    assert results["scores"]["accuracy"] == 100.0


def test_pope_metrics_per_category_from_both_layouts(root, tmp_path):
    data = make_pope(root / "s_pope")
    answers = ["Yes, there is.", "Yes", "No.", "There is not a bird."]
    results, _ = scripted_run(tmp_path / "a", "pope", data, answers)
    scores = results["scores"]
    assert scores["per_category"]["random"]["f1"] == pytest.approx(200 / 3)      # TP 1, FP 1
    assert scores["per_category"]["random"]["yes_ratio"] == 100.0
    assert scores["per_category"]["adversarial"]["accuracy"] == 50.0            # TN 1, FN 1
    assert scores["per_category"]["adversarial"]["f1"] == 0.0
    assert scores["f1"] == pytest.approx(100 / 3)                              # the mean over categories
    (data / "llava_pope_test.jsonl").rename(data / "moved.jsonl")  # POPE's own release: the label files only
    again, _ = scripted_run(tmp_path / "b", "pope", data, ["No.", "There is not a bird."] + answers[:2])
    assert again["scores"]["per_category"] == scores["per_category"]


def test_pope_labels_out_of_step_are_an_error(root):
    data = make_pope(root / "s_pope_bad")
    path = data / "coco" / "coco_pope_random.json"
    path.write_text(path.read_text().replace("dog", "horse"))
    with pytest.raises(EvalDataError, match=r"coco_pope_random\.json:1"):
        get_benchmark("pope", data).load()


def test_mme_folder_layout_prompts_and_scores(root, tmp_path):
    data = make_mme(root / "s_mme")
    # rows: artwork (images/ + questions_answer_YN/), code_reasoning, existence 0001, existence 0002
    answers = ["Yes", "No", "Yes", "Yes", "Yes", "No", "No", "maybe"]
    results, _ = scripted_run(tmp_path, "mme", data, answers)
    prompts = sent_prompts(tmp_path, "mme")
    assert prompts[0] == "<image>\nIs this by Monet?" + SA
    per_task = results["scores"]["per_task"]
    assert per_task["artwork"]["score"] == 200.0
    assert per_task["code_reasoning"]["score"] == 50.0                 # acc 50, acc+ 0
    assert per_task["existence"]["score"] == 125.0                     # acc 75, acc+ 50
    assert per_task["existence"]["other"] == 1
    assert results["scores"]["perception"] == 325.0 and results["scores"]["cognition"] == 50.0


def test_mme_malformed_question_file_names_file_and_line(root):
    data = make_mme(root / "s_mme_bad")
    bad = data / "MME_Benchmark_release_version" / "existence" / "0002.txt"
    bad.write_text("Is there a car? Please answer yes or no.\tNo\nno tab here\n")
    with pytest.raises(EvalDataError, match=r"0002\.txt:2"):
        get_benchmark("mme", data).load()


def test_scienceqa_img_accuracy_and_prompts(root, tmp_path):
    results, requests = scripted_run(tmp_path, "scienceqa", make_scienceqa(root / "s_sqa"), ["A", "A. water", "C"])
    prompts = sent_prompts(tmp_path, "scienceqa")
    assert prompts[0] == "<image>\nContext: A photo.\nWhich animal is shown?\nA. cat\nB. dog" + MC
    assert prompts[1] == "Context: N/A\nWhich is a liquid?\nA. water\nB. rock\nC. wood" + MC  # no image, no tag
    assert [len(images) for images, _ in requests] == [1, 0, 1]
    assert results["scores"]["accuracy"] == pytest.approx(200 / 3)    # "C" is beyond item 12's two choices
    assert results["scores"]["img_accuracy"] == 50.0 and results["main"] == 50.0


def test_mmbench_single_pass_prompt_and_upload_xlsx(root, tmp_path):
    results, requests = scripted_run(tmp_path, "mmbench", make_mmbench(root / "s_mmb"), ["B", "It is noon", "A"])
    prompts = sent_prompts(tmp_path, "mmbench")
    assert prompts[0] == "<image>\nWhat animal?\nA. cat\nB. dog" + MC                     # options stop at the empty C
    assert prompts[1] == "<image>\nA photo taken at noon.\nWhat time?\nA. morning\nB. noon\nC. night" + MC  # "None"
    assert requests[0][0][0].size == (32, 24)                                           # decoded from base64
    assert results["scores"]["accuracy"] == pytest.approx(200 / 3)
    sheet = load_workbook(tmp_path / "mmbench" / "submission" / "mmbench_submission.xlsx").active
    table = list(sheet.values)
    assert table[0] == ("index", "question", "A", "B", "C", "D", "prediction", "answer", "split")
    assert table[2][0] == 1 and table[2][6] == "It is noon" and len(table) == 4


def test_mmbench_rescores_with_the_early_2025_extraction_and_records_it(root, tmp_path):
    """The extraction changes the scoring only: a rerun with the other one rescores the same answers."""
    data = make_mmbench(root / "s_mmb_rules")
    replies = ["B is my guess, I think it is right but not sure at all", "It is noon", "D"]
    current, _ = scripted_run(tmp_path, "mmbench", data, replies)
    assert current["scores"]["accuracy"] == pytest.approx(200 / 3)  # the lone "B" is too early in its reply
    assert current["scores"]["extraction"] == "current" and "2cf2a36" in current["scores"]["rules"]
    early, _ = scripted_run(tmp_path, "mmbench", data, [], extraction="early2025")  # nothing is answered again
    assert early["scores"]["accuracy"] == 100.0 and "aca64db" in early["scores"]["rules"]


def test_mmbench_circular_by_rotation(root, tmp_path):
    answers = ["dog", "dog"] + ["B"] * 7  # question 0 right in both rotations; "B" is right only once elsewhere
    results, _ = scripted_run(tmp_path, "mmbench", make_mmbench(root / "s_mmbc"), answers, circular=True)
    samples = read_jsonl(tmp_path / "mmbench" / "samples.jsonl")
    assert [s["question_id"] for s in samples][:3] == [0, 1_000_000, 1]
    assert samples[1]["prompt"] == "<image>\nWhat animal?\nA. dog\nB. cat" + MC and samples[1]["reference"] == "A"
    assert results["scores"]["accuracy"] == pytest.approx(200 / 3)
    assert results["scores"]["circular_accuracy"] == pytest.approx(100 / 3)
    assert results["main_metric"] == "circular_accuracy"


def test_mmbench_circular_copies_in_the_tsv(root, tmp_path):
    d = root / "s_mmb_copies"
    d.mkdir()
    rows = [[0, "What animal?", "nan", "cat", "dog", "", "", "B", "animals", b64_png(), "s", "l2", "", "dev"],
            [1_000_000, "What animal?", "nan", "dog", "cat", "", "", "A", "animals", "0", "s", "l2", "", "dev"]]
    (d / "mine.tsv").write_text("\t".join(MMB_COLUMNS) + "\n" + "".join("\t".join(map(str, r)) + "\n" for r in rows))
    results, requests = scripted_run(tmp_path, "mmbench", d, ["B", "B"], circular=True)
    assert requests[1][0][0].size == (32, 24)  # the copy's image column names row 0
    assert results["scores"]["accuracy"] == 100.0 and results["scores"]["circular_accuracy"] == 0.0


def test_mmbench_tsv_with_copies_runs_every_row_and_scores_circularly_by_default(root, tmp_path):
    d = root / "s_mmb_copies_default"
    d.mkdir()
    rows = [[0, "What animal?", "nan", "cat", "dog", "", "", "B", "animals", b64_png(), "s", "l2", "", "dev"],
            [1, "What time?", "nan", "noon", "night", "", "", "A", "time", b64_png(), "s", "l2", "", "dev"],
            [1_000_000, "What animal?", "nan", "dog", "cat", "", "", "A", "animals", "0", "s", "l2", "", "dev"],
            [1_000_001, "What time?", "nan", "night", "noon", "", "", "B", "time", "1", "s", "l2", "", "dev"]]
    (d / "mmbench_dev_20230712.tsv").write_text("\t".join(MMB_COLUMNS) + "\n"
                                                + "".join("\t".join(map(str, r)) + "\n" for r in rows))
    results, _ = scripted_run(tmp_path, "mmbench", d, ["B", "A", "B", "B"])  # LLaVA runs all four rows
    assert results["main_metric"] == "circular_accuracy" and results["main"] == 50.0
    assert results["scores"]["accuracy"] == 100.0  # single pass over the original questions
    table = list(load_workbook(tmp_path / "mmbench" / "submission" / "mmbench_submission.xlsx").active.values)
    assert [r[0] for r in table[1:]] == [0, 1, 1_000_000, 1_000_001]  # the upload holds every row
    single, _ = scripted_run(tmp_path / "single", "mmbench", d, ["B", "A"], circular=False)
    assert single["main_metric"] == "accuracy" and single["n"] == 2


def test_mmbench_cn_suffix_and_bad_tsv(root, tmp_path):
    scripted_run(tmp_path, "mmbench_cn", make_mmbench(root / "s_mmbcn", "mmbench_cn", "（中文）"), ["B", "B", "D"])
    assert sent_prompts(tmp_path, "mmbench_cn")[0].endswith("What animal?（中文）\nA. cat\nB. dog\n请直接回答选项字母。")
    bad = root / "s_mmb_bad"
    bad.mkdir()
    (bad / "x.tsv").write_text("index\tquestion\tA\tB\timage\n0\tq\ta\tb\tnot-base64-at-all!!\n")
    with pytest.raises(EvalDataError, match=r"x\.tsv:2"):
        scripted_run(tmp_path / "bad", "mmbench", bad, ["A"])


def test_seed_bench_exact_letter_per_question_type(root, tmp_path):
    results, _ = scripted_run(tmp_path, "seed_bench", make_seed(root / "s_seed"), ["B", "A."])
    assert sent_prompts(tmp_path, "seed_bench")[0] == "<image>\nHow many apples?\nA. 1\nB. 2\nC. 3\nD. 4" + MC
    assert results["n"] == 2  # the video question is left out
    assert results["scores"]["accuracy"] == 50.0
    assert results["scores"]["per_question_type"] == {"Instances Counting": 100.0, "Scene Understanding": 0.0}


def test_refcoco_acc_at_half_iou(root, tmp_path):
    results, _ = scripted_run(tmp_path, "refcoco", make_refcoco(root / "s_ref"),
                              ["[0.25, 0.25, 0.75, 0.75]", "[0.0, 0.25, 0.2, 0.75]"])
    assert sent_prompts(tmp_path, "refcoco")[0] == ("<image>\nPlease provide the bounding box coordinate of the "
                                                    "region this sentence describes: left dog")
    assert results["scores"]["accuracy"] == 50.0  # (50,0,150,100) matches exactly; (0,0,40,100) misses
    test_split, _ = scripted_run(tmp_path / "g", "refcocog", make_refcoco(root / "s_refg"), ["[0.75, 0.3, 0.95, 0.5]"],
                                 split="test")
    assert test_split["scores"]["accuracy"] == 100.0  # (150, 10, 190, 50) after unpadding


def test_refcoco_refuses_a_pickle_that_holds_code(root, tmp_path):
    d = make_refcoco(root / "s_ref_bad")
    (d / "refs(unc).p").write_bytes(pickle.dumps([datetime.date(2020, 1, 1)]))
    with pytest.raises(EvalDataError, match="refusing"):
        get_benchmark("refcoco", d).load()


def test_mmmu_prompt_images_and_parsing(root, tmp_path):
    results, requests = scripted_run(tmp_path, "mmmu", make_mmmu(root / "s_mmmu"), ["(B)", "The answer is 41."])
    prompts = sent_prompts(tmp_path, "mmmu")
    assert prompts[0] == ("<image>\nWhat is in <image 1>?\nA. a cat\nB. a dog\nC. a bird\n\n"
                          "Answer with the option's letter from the given choices directly.")
    assert prompts[1].startswith("<image> <image>\nCompare <image 2> and <image 1>.")
    assert [len(images) for images, _ in requests] == [1, 2]
    assert results["scores"]["accuracy"] == 50.0
    assert results["scores"]["per_subject"] == {"Art": 100.0, "Math": 0.0}


def test_synthworld_benchmark_uses_the_synthworld_scorer(root, tmp_path):
    data = make_synthworld(root / "s_synth")
    rows = get_benchmark("synthworld", data).load()
    results, _ = scripted_run(tmp_path, "synthworld", data, [r.reference for r in rows])
    assert results["scores"]["accuracy"] == 100.0
    assert set(results["scores"]["per_family"]) == {"colour", "mc", "grounding"}


# ----------------------------------------------------------------------------- the GPT judge (fake endpoint)


def test_mmvet_official_grader_protocol(root, tmp_path, fake_openai):
    fake_openai.requests.clear()
    results, _ = scripted_run(tmp_path, "mmvet", make_mmvet(root / "s_mmvet"), ["a kitten", "five"], fake=fake_openai)
    first = fake_openai.requests[0]
    assert first["model"] == "gpt-4-0613" and first["max_tokens"] == 3 and first["temperature"] == 0.0
    assert first["authorization"] == "Bearer sk-test"
    assert first["messages"][0]["content"].endswith("\nWhat is this? | a cat <OR> kitten | a kitten | ")
    # "five" gets an unparseable grade, then the retry prompt at temperature 0.0, graded 0.5
    assert [r["messages"][0]["content"].endswith(MMVET_RETRY) for r in fake_openai.requests] == [False, False, True]
    assert fake_openai.requests[2]["temperature"] == 0.0
    scores = results["scores"]
    assert scores["total"] == 75.0
    assert scores["per_capability"] == {"rec": 100.0, "know": 100.0, "ocr": 50.0, "math": 50.0}
    assert results["judge"] == {"base_url": fake_openai.url, "model": "gpt-4-0613"}
    submitted = json.loads((tmp_path / "mmvet" / "submission" / "mmvet_results.json").read_text())
    assert submitted == {"v1_0": "a kitten", "v1_1": "five"}


def test_llava_bench_review_protocol_and_relative_score(root, tmp_path, fake_openai):
    fake_openai.requests.clear()
    data = make_llava_bench(root / "s_llavab")
    results, _ = scripted_run(tmp_path, "llava_bench", data, ["good answer", "bad"], fake=fake_openai)
    request = fake_openai.requests[0]
    assert request["model"] == "gpt-4-0314" and request["temperature"] == 0.2 and request["max_tokens"] == 1024
    assert request["messages"][0] == {"role": "system", "content": "You are a helpful and precise assistant for "
                                                                   "checking the quality of the answer."}
    assert request["messages"][1]["content"].startswith(
        "[Context]\nA red square.\n\n[Question]\nDescribe it.\n\n[Assistant 1]\nA red square on white.\n\n"
        "[End of Assistant 1]\n\n[Assistant 2]\ngood answer\n\n[End of Assistant 2]\n\n[System]\nWe would like")
    scores = results["scores"]
    assert scores["per_category"]["detail"]["relative_score"] == 88.9   # 8 / 9
    assert scores["per_category"]["conv"]["relative_score"] == 50.0     # 4 / 8
    assert scores["relative_score"] == 70.6                             # 6 / 8.5
    # a rerun rescoring the same answers is served from the judge cache: no new requests
    n = len(fake_openai.requests)
    again = evaluate(Scripted([]), "llava_bench", data, out=tmp_path, quiet=True,
                     judge={"base_url": fake_openai.url, "api_key": "sk-test"})
    assert len(fake_openai.requests) == n and again["scores"] == scores


def test_judge_retries_transient_errors_and_fails_fast_on_others(tmp_path):
    server = FakeOpenAI(lambda body: "ok")
    try:
        judge = Judge(base_url=server.url, model="m", api_key="k", backoff=0.0, max_retries=3)
        server.fail = [500, 429]
        assert judge.chat([{"role": "user", "content": "a"}]) == "ok" and len(server.requests) == 3
        server.fail = [401]
        with pytest.raises(JudgeError, match="HTTP 401"):
            judge.chat([{"role": "user", "content": "b"}])
        assert len(server.requests) == 4
        server.fail = [503] * 4
        with pytest.raises(JudgeError, match="gave up after 4 attempts"):
            judge.chat([{"role": "user", "content": "c"}])
        cached = Judge(base_url=server.url, model="m", api_key="k", cache=tmp_path / "cache.jsonl")
        n = len(server.requests)
        assert cached.chat([{"role": "user", "content": "d"}]) == "ok"
        assert Judge(base_url=server.url, model="m", cache=tmp_path / "cache.jsonl").chat(
            [{"role": "user", "content": "d"}]) == "ok"
        assert len(server.requests) == n + 1  # the second judge read the reply from the cache file
    finally:
        server.close()


def test_judge_without_key_for_openai_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(JudgeError, match="OPENAI_API_KEY"):
        Judge(model="gpt-4-0613").chat([{"role": "user", "content": "x"}])


def test_malformed_question_files_name_the_file_and_line(root):
    data = make_vqav2(root / "s_vqav2_bad")
    path = data / "llava_vqav2_mscoco_test-dev2015.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], '{"question_id": 5, "image": "x.jpg", "text": "cut', lines[2]]) + "\n")
    with pytest.raises(EvalDataError, match=r"test-dev2015\.jsonl:2: not valid JSON"):
        get_benchmark("vqav2", data).load()
    path.write_text("\n".join([lines[0], '{"question_id": 5, "image": "x.jpg"}']) + "\n")
    with pytest.raises(EvalDataError, match=r"test-dev2015\.jsonl:2: missing field 'text'"):
        get_benchmark("vqav2", data).load()
    with pytest.raises(EvalDataError, match=r"question file not found: .*nope\.jsonl"):
        get_benchmark("vqav2", data, question_file="nope.jsonl").load()


def test_malformed_annotation_files_name_the_file_and_row(root):
    data = make_vizwiz(root / "s_vizwiz_bad")
    write_json(data / "val.json", [{"image": "VizWiz_test_00000000.jpg", "answers": [{"answer": "x"}] * 10},
                                   {"image": "VizWiz_test_00000001.jpg"}])
    with pytest.raises(EvalDataError, match=r"val\.json: image VizWiz_test_00000001\.jpg: missing field 'answers'"):
        get_benchmark("vizwiz", data, annotation_file="val.json").load()
    data = make_textvqa(root / "s_textvqa_bad")
    write_json(data / "TextVQA_0.5.1_val.json", {"data": [{"image_id": "imgA", "answers": []}]})
    with pytest.raises(EvalDataError, match=r"TextVQA_0\.5\.1_val\.json: data\[0\]: missing field 'question'"):
        get_benchmark("textvqa", data).load()
    data = make_llava_bench(root / "s_llava_bench_bad")
    write_jsonl(data / "context.jsonl", [{"id": "001", "caption": "A red square."}])
    with pytest.raises(EvalDataError, match=r"context\.jsonl:1: missing field 'image'"):
        get_benchmark("llava_bench", data).load()
