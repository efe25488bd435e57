"""Forward+backward of a plain model vs transformers' LlavaForConditionalGeneration, same weights and batch.

Prints one JSON line: time ratio (ours / transformers; target ≤ 1.05) and activation memory ratio
(bytes autograd saves for backward, a deterministic proxy for peak training memory on CPU; on a GPU
the peak allocated memory is used instead; target ≤ 1.0).
"""

from __future__ import annotations

import torch

from common import batch, emit, interleaved, model_pair


def step(model, ids, mask, pixels, labels):
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels).loss.backward()


def saved_bytes(fn) -> int:
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def peak_bytes(fn, device) -> int:
    if device.type != "cuda":
        return saved_bytes(fn)
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    fn(); torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def main():
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ours, hf = (m.to(device).train() for m in model_pair())
    ids, mask, pixels = (t.to(device) for t in batch(ours.config))
    labels = ids.masked_fill((mask == 0) | (ids == ours.config.image_token_id), -100)
    run_ours = lambda: step(ours, ids, mask, pixels, labels)  # noqa: E731
    run_hf = lambda: step(hf, ids, mask, pixels, labels)  # noqa: E731
    t_ours, t_hf = interleaved(run_ours, run_hf)
    mem_ours, mem_hf = peak_bytes(run_ours, device), peak_bytes(run_hf, device)
    emit({"bench": "train_step", "device": device.type, "tokens": int(mask.sum()), "ours_s": round(t_ours, 4),
          "transformers_s": round(t_hf, 4), "time_ratio": round(t_ours / t_hf, 3),
          "memory_ratio": round(mem_ours / mem_hf, 3), "memory_measure": "cuda_peak" if device.type == "cuda" else "saved_activations"})


if __name__ == "__main__":
    main()
