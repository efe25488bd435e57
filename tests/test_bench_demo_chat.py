"""bench/demo_chat.py: the chat questions asked and their scoring, checked by hand."""

from bench_helpers import load_bench_script

from polyfocus.synthworld.tasks import SHORT_ANSWER, Task

bench = load_bench_script("demo_chat")


def chat(asks: str, answer: str) -> Task:
    return Task("chat", "q", "q", answer, [], {"asks": asks})


def test_the_score_counts_exact_sentences_the_object_named_and_one_word_replies():
    tasks = [chat("colour", "The circle is white."), chat("colour", "The large star is red."),
             chat("shape", "The red object is a star."), chat("unknowable", "I cannot tell from the image."),
             chat("colour", "The circle is white.")]
    replies = ["the circle is white.", "The star is red.", "The red object is a circle.", "yes", "The circle is red."]
    result = bench.score([1, 1, 1, 1, 2], tasks, replies)
    first = result["turn1"]
    assert first["exact"] == {"colour": 50.0, "shape": 0.0, "unknowable": 0.0}  # case aside, only the first matches
    assert first["exact_all"] == 25.0 and first["questions"] == 4
    # "The star is" is not "the large star": 2 of the 3 colour/shape replies name the object asked (one wrongly)
    assert first["names_the_object"] == 66.7 and first["one_word_replies"] == 1
    assert first["exists_yes_no"] is None
    assert result["turn2"] == {"exact": {"colour": 0.0}, "exact_all": 0.0, "names_the_object": 100.0,
                               "exists_yes_no": None, "one_word_replies": 0, "questions": 1}


def test_is_there_replies_score_their_yes_or_no_apart_from_the_exact_sentence():
    tasks = [chat("exists", "Yes, there is a red square."), chat("exists", "No, there is no star in the image."),
             chat("exists", "Yes, there are two circles."), chat("exists", "No, there is no ring in the image.")]
    replies = ["Yes, there is a blue square.", "No, there is no star in the image.", "No, there is no circle.", "Yes"]
    result = bench.score([1, 1, 1, 1], tasks, replies)["turn1"]
    assert result["exact"] == {"exists": 25.0} and result["exists_yes_no"] == 50.0 and result["one_word_replies"] == 1


def test_each_scene_asks_a_chat_question_alone_then_another_after_the_first_and_its_truth(tmp_path):
    asked = bench.conversations(20, tmp_path)
    assert len(asked) == 40 and len(list(tmp_path.glob("*.png"))) == 20
    for (image, first, task), (image2, second, task2) in zip(asked[::2], asked[1::2]):
        assert image == image2 and first == second[:1]
        assert first[0]["content"] == "<image>\n" + task.question
        assert second[1:] == [{"role": "assistant", "content": task.answer},
                              {"role": "user", "content": task2.question}]
        assert SHORT_ANSWER not in task.question + task2.question and task.family == task2.family == "chat"
        assert task.question != task2.question  # the second turn's answer is never already in the conversation


def test_the_kind_of_question_does_not_follow_from_the_number_of_objects(tmp_path):
    """The questions are drawn apart from the scene: seeded like it, a colour or shape question went only to
    one-object scenes (the easiest) and the first turn's figures read too high."""
    from polyfocus.synthworld.scenes import make_scene

    asked = bench.conversations(60, tmp_path)
    objects = {}
    for (image, _, task) in asked[::2]:
        i = int(image.rsplit("/", 1)[1].removesuffix(".png"))
        n = len(make_scene(f"chat/{i}", 112, 3, sizes=("medium", "large")).objects)
        objects.setdefault(task.meta["asks"], set()).add(n)
    assert {1, 2, 3} <= objects["colour"] | objects["shape"] and len(objects["unknowable"]) > 1, objects
