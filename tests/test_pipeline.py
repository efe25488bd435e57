"""End to end on synthworld: export → dataset → collator → model, as training and inference will use them."""

import pytest
import torch

from polyfocus import PolyfocusForConditionalGeneration
from polyfocus.config import IGNORE_INDEX
from polyfocus.data.dataset import DataCollator, SupervisedDataset
from polyfocus.data.images import ImageProcessor
from polyfocus.data.templates import encode, get_template
from polyfocus.data.tokenizer import default_tokenizer
from polyfocus.model.presets import tiny_config
from polyfocus.synthworld.scenes import export


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    export(str(out), 3, seed=0, families=["count", "text", "caption"])
    tokenizer = default_tokenizer()
    torch.manual_seed(0)
    model = PolyfocusForConditionalGeneration(tiny_config(image_token_id=tokenizer.convert_tokens_to_ids("<image>"))).eval()
    dataset = SupervisedDataset(out / "train.json", out, tokenizer, "vicuna_v1", ImageProcessor(image_size=56),
                                model.config.image_token_id, model.config.num_image_tokens, model_max_length=512)
    return model, dataset, tokenizer


@pytest.mark.parametrize("side", ["right", "left"])
def test_batch_loss_equals_token_weighted_mean_of_sample_losses(setup, side):
    model, dataset, tokenizer = setup
    items = [dataset[i] for i in range(4)]
    collate = DataCollator(tokenizer.pad_token_id, side)
    batch_loss = model(**collate(items)).loss
    total, count = 0.0, 0
    for item in items:
        single = collate([item])
        n = int((single["labels"][:, 1:] != IGNORE_INDEX).sum())  # shifted targets
        total, count = total + model(**single).loss * n, count + n
    assert torch.allclose(batch_loss, total / count, atol=1e-5)


def test_supervised_tokens_are_the_answer(setup):
    model, dataset, tokenizer = setup
    item = dataset[0]
    answer = dataset.samples[0].messages[-1]["content"]
    supervised = item["labels"][item["labels"] != IGNORE_INDEX]
    # vicuna_v1 renders "ASSISTANT: <answer></s>"; the space is part of the answer's first token, as in LLaVA.
    assert tokenizer.decode(supervised) == " " + answer + "</s>"
    assert int((item["input_ids"] == model.config.image_token_id).sum()) == model.config.num_image_tokens


def test_inference_prompt_is_the_training_prefix_and_generates(setup):
    model, dataset, tokenizer = setup
    sample = dataset.samples[0]
    template = get_template("vicuna_v1")
    prompt = encode(sample.messages[:-1], tokenizer, template, model.config.image_token_id,
                    [model.config.num_image_tokens], add_generation_prompt=True).input_ids
    assert dataset[0]["input_ids"][: len(prompt)].tolist() == prompt
    pixels = dataset[0]["pixel_values"]
    out = model.generate(input_ids=torch.tensor([prompt]), pixel_values=pixels, max_new_tokens=4, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)
    assert out.shape == (1, len(prompt) + 4) and out[0, : len(prompt)].tolist() == prompt
