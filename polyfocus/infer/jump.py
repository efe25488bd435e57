"""Jump-forward decoding of DualFocus's box reply, verified so that it decodes exactly what greedy decoding does.

A box reply is `box_text`'s "[0.12, 0.34, 0.56, 0.78]": of its ~25 tokens (Llama splits digits), 8 vary and the rest
follow from the format ("[", "0.", ", ", "]", the end token). SGLang's jump-forward decoding (a compressed finite-state
machine of a constrained format, lmsys.org/blog/2024-02-05-compressed-fsm, `sglang/srt/constrained/jump_forward.py`)
appends such text in one pass without asking the model, because its grammar forbids anything else. The box format is
not enforced (the reference decodes freely, and "0." is only likely), so here the text is a *draft*, as in speculative
decoding (Leviathan et al. 2023; transformers' assisted decoding checks its candidates the same way): the row feeds
its newest token and the draft in one pass, and keeps the draft's tokens up to the first one
that greedy decoding would not have produced (the argmax after the tokens before it), then greedy's own token there.
So the decoded tokens are greedy decoding's whatever the draft (a wrong guess, such as the "0" of "1.00", or a
tokenization the model does not use, costs only the pass's extra width), up to the float rounding by which a
multi-token pass may differ from one-token steps, the same as between batched and unbatched decoding.
"""

from __future__ import annotations

from collections.abc import Sequence

from polyfocus.data.prompts import box_continuation, box_text


class BoxDrafter:
    """draft(generated ids) -> the ids the box format puts next (possibly none): its fixed characters, tokenized in
    context, and the reply's end token once the box is complete."""

    def __init__(self, tokenizer, end_id: int, lead: Sequence[int] = ()):
        self.tokenizer, self.end_id = tokenizer, end_id
        self.lead = list(lead)  # the reply's first tokens, up to its "[0.", as the template writes a reply

    @classmethod
    def for_pipe(cls, pipe) -> BoxDrafter:
        """For a Pipeline's tokenizer and template: the end token is the template's stop when it is one token, else
        EOS; the lead is what the template puts before a box reply's "[0." too (Vicuna's " ")."""
        end_id = pipe._stop_kwargs()["eos_token_id"][-1]
        probe = [{"role": "user", "content": "Where?"}]
        prompt = pipe.encode(probe, 0)
        reply = pipe.encode([*probe, {"role": "assistant", "content": box_text((0, 0, 0, 0))}], 0,
                            add_generation_prompt=False)
        lead, start = [], box_continuation("")
        if reply[: len(prompt)] == prompt:  # the template writes a reply as a continuation of the prompt
            for k in range(1, len(reply) - len(prompt) + 1):
                text = pipe.tokenizer.decode(reply[len(prompt): len(prompt) + k], skip_special_tokens=True)
                if text.lstrip() == start:
                    lead = reply[len(prompt): len(prompt) + k]
                    break
                if not start.startswith(text.lstrip()):
                    break
        return cls(pipe.tokenizer, end_id, lead)

    def __call__(self, generated: Sequence[int]) -> list[int]:
        generated = list(generated)
        if not generated and self.lead:
            return list(self.lead)
        text = self.tokenizer.decode(generated, skip_special_tokens=True)
        rest = box_continuation(text)
        if rest is None:  # not a box as box_text writes it: no guess
            return []
        ids = []
        if rest:  # tokenized after the text so far, so that merges with it come out as the tokenizer makes them
            full = self.tokenizer.encode(text + rest, add_special_tokens=False)
            n = len(generated)
            ids = full[n:] if full[:n] == generated else self.tokenizer.encode(rest, add_special_tokens=False)
        if (text + rest).rstrip().endswith("]"):  # the box is complete: the reply ends
            ids.append(self.end_id)
        return ids


def accepted(draft: Sequence[int], predictions: Sequence[int]) -> list[int]:
    """The tokens greedy decoding produces from a pass that fed [newest token, *draft]: predictions[j] is the greedy
    token after draft[:j] (len(draft) + 1 of them). The draft up to its first token that greedy decoding would not
    produce, then greedy's token at that place (or after the whole draft)."""
    for j, token in enumerate(draft):
        if predictions[j] != token:
            return [*draft[:j], predictions[j]]
    return [*draft, predictions[len(draft)]]
