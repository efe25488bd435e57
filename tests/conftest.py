import os

# Tests are offline: nothing may come from a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch

# One thread per test process: the tiny models gain nothing from two, and two threads fighting over a busy
# 2-core machine made some tests many times slower.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# The tiny saved checkpoint and its pipeline that the eval, chat and strategy tests share (a module may define its own).
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from eval_helpers import save_tiny_checkpoint

    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def pipe(ckpt):
    from polyfocus.infer.pipeline import Pipeline

    return Pipeline.from_pretrained(ckpt, device="cpu")
