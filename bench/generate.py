"""Batched greedy generation: tokens/s of ours vs transformers' LlavaForConditionalGeneration.generate on the
same weights and batch. One JSON line; target ratio (ours / transformers) ≥ 1.0."""

from __future__ import annotations

import torch

from common import batch, emit, interleaved, model_pair

NEW_TOKENS = 32


def main():
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ours, hf = (m.to(device) for m in model_pair())
    ids, mask, pixels = (t.to(device) for t in batch(ours.config, batch_size=8))
    kwargs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=NEW_TOKENS,
                  min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    same = torch.equal(ours.generate(**kwargs), hf.generate(**kwargs))
    with torch.inference_mode():
        t_ours, t_hf = interleaved(lambda: ours.generate(**kwargs), lambda: hf.generate(**kwargs), repeats=5)
    tokens = NEW_TOKENS * ids.shape[0]
    emit({"bench": "generate", "device": device.type, "batch": ids.shape[0], "new_tokens": NEW_TOKENS,
          "ours_tok_s": round(tokens / t_ours, 1), "transformers_tok_s": round(tokens / t_hf, 1),
          "ratio": round(t_hf / t_ours, 3), "same_tokens": same})


if __name__ == "__main__":
    main()
