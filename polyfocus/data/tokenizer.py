"""A small byte-level BPE tokenizer, trained in a fraction of a second, for the tiny offline models.

Nothing comes from a model hub, so the demo and the tests train their own tokenizer: byte-level BPE
(the `tokenizers` library) on a built-in corpus of plain English plus synthworld's words and the
templates' prompts, wrapped as a transformers ``PreTrainedTokenizerFast`` with a ``chat_template``
that renders exactly what ``polyfocus.data.templates.render`` renders.

- Special tokens, each a single id: ``<unk>`` 0, ``<s>`` 1 (bos), ``</s>`` 2 (eos), ``<pad>`` 3,
  ``<image>`` 4 (also ``tokenizer.image_token``), then the turn tokens of the ChatML, Llama-3 and Phi-3
  templates. Llama-3's ``<|begin_of_text|>`` is not one of them: ``<s>`` is the BOS for every template.
- Newlines are always tokens of their own (pre-tokenizer split), as in SentencePiece vocabularies. It
  makes a segment that starts after a newline tokenize the same alone as in the full string, which
  the piecewise ``encode`` relies on (a ChatML reply starting with a space or newline would otherwise
  merge with the "\\n" before it).
- Whether the tokenizer prepends ``<s>`` follows the template's model family (``Template.bos``): yes
  for Vicuna / Llama / Mistral / plain, no for ChatML / MPT / Phi-3.
- Deterministic: the same corpus and vocab_size give the same vocabulary and merges.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from polyfocus.data.templates import AUTO_NAMES, IMAGE_TOKEN, TEMPLATES, TemplateError, get_template, render

BOS, EOS, UNK, PAD = "<s>", "</s>", "<unk>", "<pad>"
CHAT_TOKENS = (
    "<|im_start|>", "<|im_end|>",  # ChatML / MPT
    "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",  # Llama-3
    "<|system|>", "<|user|>", "<|assistant|>", "<|end|>",  # Phi-3
)
SPECIAL_TOKENS = (UNK, BOS, EOS, PAD, IMAGE_TOKEN, *CHAT_TOKENS)  # ids 0, 1, 2, ... in this order


def build_tokenizer(corpus: Iterable[str] | None = None, vocab_size: int = 2048, save_dir: str | Path | None = None,
                    chat_template: str = "vicuna_v1", split_digits: bool = False) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``corpus`` (default: a built-in one) and wrap it for transformers.

    ``vocab_size`` is an upper bound: training stops earlier when the corpus has no more pairs to merge
    (the built-in corpus gives about 1,800 ids).

    ``split_digits``: every digit a token of its own, and a space before a digit one too, as Llama's SentencePiece
    vocabulary has it (``[0.25, 0.30, 0.60, 0.75]`` is then 25 tokens, as for LLaVA-1.5; 17 without).

    ``chat_template`` names the built-in template whose Jinja version is attached (and whose family
    decides whether a BOS is prepended). With ``save_dir`` the tokenizer is also saved there with
    ``save_pretrained``; ``AutoTokenizer.from_pretrained(save_dir)`` loads it back offline.
    """
    if chat_template in AUTO_NAMES:
        raise TemplateError(f"build_tokenizer attaches a built-in chat template; {chat_template!r} is not one")
    template = get_template(chat_template)
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split("\n", behavior="isolated"),
        *([pre_tokenizers.Digits(individual_digits=True)] if split_digits else []),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(default_corpus() if corpus is None else corpus, trainer)

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=PAD,
        extra_special_tokens={"image_token": IMAGE_TOKEN},  # -> tokenizer.image_token(_id), as HF LLaVA
        add_bos_token=template.bos, add_eos_token=False,
        chat_template=template.to_jinja(),
        clean_up_tokenization_spaces=False,  # decode must give back the exact text
    )
    if save_dir is not None:
        tokenizer.save_pretrained(str(save_dir))
    return tokenizer


@functools.lru_cache(maxsize=None)
def default_tokenizer(chat_template: str = "vicuna_v1") -> PreTrainedTokenizerFast:
    """The tokenizer of the built-in corpus, built once per process (shared: do not modify it)."""
    return build_tokenizer(chat_template=chat_template)


# ----------------------------------------------------------------------------- built-in corpus

_ENGLISH = """\
The image shows a simple scene with a few objects on a plain background.
There is a small red circle in the top left corner and a large blue square near the center.
A green triangle is to the right of the yellow star, and a purple hexagon is below it.
Look at the picture carefully and answer the question about what you can see.
The objects have different colours, shapes and sizes, and some of them carry a short text code.
The code is written in small letters, so it can only be read when the image is seen at a high resolution.
Count the objects of each kind, then tell me how many there are in total.
Describe the image in detail. Describe the image briefly.
Please provide a short description for this region.
Please provide the bounding box coordinate of the region this sentence describes:
Is there a black cross in the image? Yes, there is. No, there is not.
Which object is closest to the bottom right corner of the image?
What is written on the orange diamond? What is the text on the white ring?
The assistant gives helpful, detailed, and polite answers to the user's questions.
It is a sunny day and the people in the park are walking their dogs along the river.
She said that he would come back later, but they were not sure when it would happen.
A picture is worth a thousand words, and a good caption should describe what matters most.
This is one of the most important things to know about how the model learns from data.
We can see that the first one is bigger than the second one, which is smaller than the third.
Once upon a time there was a little girl who lived in a village near the forest with her grandmother.
Every morning she went to the market to buy bread, milk, eggs, apples and fresh vegetables.
The weather was cold in the winter and warm in the summer, with heavy rain during the spring months.
Scientists have discovered that the human brain processes visual information faster than text.
A computer program reads the input, computes the result, and writes the output to a file on disk.
The train leaves the station at seven o'clock in the evening and arrives early the next morning.
My friends and I played football in the street until it became too dark to see the ball.
Students should read the instructions before they start writing their answers on the paper.
The history of the city goes back more than two thousand years, to the time of the ancient kings.
Water boils at one hundred degrees and freezes at zero degrees at normal air pressure.
He opened the window, looked outside, and noticed a bird sitting quietly on the branch of a tree.
The company announced new products, better prices and faster delivery for its customers.
You can find more information about this topic in the library or on the internet.
Music, art and literature help people express their feelings and understand each other.
The doctor told the patient to drink more water, sleep well, and walk for an hour every day.
Mountains, rivers, lakes and oceans cover large parts of the earth and shape its climate.
The children were laughing and running around the garden while their parents prepared dinner.
Each question has exactly one correct answer, so choose carefully and check your work twice.
Although the road was long and difficult, the travellers finally reached their destination.
Our team worked together to solve the problem, and everyone learned something new.
The kitchen table was covered with books, papers, cups of coffee and a broken pencil.
Why do leaves change their colour in autumn? Because the trees stop making green chlorophyll.
When did you last visit your family? I visited them last month, during the holidays.
Who wrote this letter? I think it was written by somebody who knew the house very well.
Should we go now, or would you rather wait until the rain has stopped completely?
Please write a detailed description of the photograph, including every person and object.
The cat sat on the mat, the dog slept by the door, and the horse stood in the field.
A man is riding a bicycle down a busy street next to a red bus and several parked cars.
Two women are sitting at a table in a restaurant, eating pizza and drinking glasses of wine.
A group of people is standing on a beach, watching the sunset over the calm blue sea.
An airplane is flying high above the clouds on a clear day, leaving a long white trail.
A plate of food with rice, chicken, broccoli and carrots is placed on a wooden table.
A young boy holding a kite is standing on the grass in a large park with tall trees.
"""
_COLOURS = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "white", "black", "grey", "beige")
_SHAPES = ("circle", "square", "triangle", "diamond", "star", "hexagon", "cross", "ring")
_SIZES = ("small", "medium", "large")
_PLACES = ("left", "right", "top", "bottom", "center", "above", "below", "next to", "in front of", "behind")
_NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
            "eleven", "twelve")
_INSTRUCTIONS = (
    "Answer the question using a single word or phrase.",
    "Answer with the option's letter from the given choices directly.",
    "Please answer yes or no.",
)


def default_corpus() -> Iterator[str]:
    """Plain English, synthworld's vocabulary, and a rendered conversation per built-in template."""
    yield from _ENGLISH.splitlines()
    for i, shape in enumerate(_SHAPES):
        for j, colour in enumerate(_COLOURS):
            size, place = _SIZES[(i + j) % len(_SIZES)], _PLACES[(i * 3 + j) % len(_PLACES)]
            yield f"a {size} {colour} {shape} on the {place}"
            yield f"What colour is the {shape}? What color is the {size} {shape}? {colour.capitalize()}"
            yield f"How many {shape}s are there? There are {_NUMBERS[(i + j) % 13]} {colour} {shape}s."
            yield f"Is there a {colour} {shape} in the image? {_INSTRUCTIONS[(i + j) % 3]}"
            yield (f"Where is the {colour} {shape}? It is {place} the {_COLOURS[(j + 1) % len(_COLOURS)]} "
                   f"{_SHAPES[(i + 1) % len(_SHAPES)]}.")
            yield f"[0.{i}{j}, 0.{j}{i}, 0.{i + 1}{j + 2}, 0.{j + 3}{i + 4}]"
            yield f"A. {shape} B. {colour} C. {size} D. {place}"
    yield " ".join(str(n) for n in range(101))
    yield " ".join(_NUMBERS)
    example = [{"role": "user", "content": "<image>\nWhat is the shape of the red object? " + _INSTRUCTIONS[0]},
               {"role": "assistant", "content": "A circle."},
               {"role": "user", "content": "How many objects are there?"},
               {"role": "assistant", "content": "Three."}]
    for name, template in TEMPLATES.items():
        turns = example[:2] if template.images_only else example
        for _ in range(4):  # weight the templates' fixed strings so they get merges of their own
            yield render(turns, template)
