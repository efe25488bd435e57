"""synthworld's own benchmark: a split exported by `polyfocus synth` (`<split>.json` + `images/`), scored per task
family by polyfocus.synthworld.scorer (exact match after normalisation, option letters, IoU >= 0.5 boxes, caption
F1). The prompt is the sample's user turn as exported (it already carries "<image>\\n" and the LLaVA-1.5
answer-format instruction of its family)."""

from __future__ import annotations

from polyfocus.data.formats import DataError, load_samples
from polyfocus.eval.benchmarks.base import Benchmark, EvalDataError, Row, percent
from polyfocus.synthworld import scorer
from polyfocus.synthworld.tasks import FAMILIES


class Synthworld(Benchmark):
    name = "synthworld"
    max_new_tokens = 64
    main_metric = "accuracy"

    def __init__(self, data, split: str = "test"):
        super().__init__(data)
        self.split = split
        self.samples: dict = {}

    def load(self) -> list[Row]:
        path = self.require(f"{self.split}.json", f"synthworld split (export one with: polyfocus synth --split "
                                                  f"{self.split} --out {self.data})")
        try:
            samples = load_samples(path)
        except DataError as e:
            raise EvalDataError(str(e)) from None
        rows = []
        for sample in samples:
            question = scorer.question_of(sample)
            if len(question) != 1 or "family" not in sample.extra:
                raise EvalDataError(f"{path}: sample {sample.name} is not a single-turn synthworld question")
            self.samples[sample.id] = sample
            rows.append(Row(question_id=sample.id, prompt=question[0]["content"],
                            images=[self.data / p for p in sample.images], question=question[0]["content"],
                            reference=scorer.reference_of(sample), where=f"{path}: sample {sample.name}",
                            meta={"family": sample.extra["family"]}))
        return rows

    def score_one(self, row: Row, answer: str) -> dict:
        return {"score": scorer.score(self.samples[row.question_id], answer)}

    def aggregate(self, rows, judged) -> dict:
        groups: dict[str, list[float]] = {}
        for row, j in zip(rows, judged):
            groups.setdefault(row.meta["family"], []).append(j["score"])
        order = [f for f in FAMILIES if f in groups] + sorted(set(groups) - set(FAMILIES))
        return {"n": len(rows), "accuracy": percent(j["score"] for j in judged),
                "per_family": {f: {"n": len(groups[f]), "accuracy": percent(groups[f])} for f in order}}
