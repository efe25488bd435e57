"""The benchmarks, by the name `polyfocus eval --benchmark NAME` takes. Each reads its own published files from
a local directory (LLaVA's `playground/data/eval/<bench>` layout or the original release); see
docs/evaluation.md for the files each expects."""

from __future__ import annotations

import inspect

from polyfocus.eval.benchmarks.base import Benchmark, EvalDataError, Row
from polyfocus.eval.benchmarks.gqa import GQA, GQAMCQ
from polyfocus.eval.benchmarks.judged import LLaVABench, MMVet
from polyfocus.eval.benchmarks.mmbench import MMBench, MMBenchCN
from polyfocus.eval.benchmarks.mme import MME
from polyfocus.eval.benchmarks.mmmu import MMMU
from polyfocus.eval.benchmarks.pope import POPE
from polyfocus.eval.benchmarks.refcoco import RefCOCO, RefCOCOg, RefCOCOPlus
from polyfocus.eval.benchmarks.scienceqa import ScienceQA
from polyfocus.eval.benchmarks.seed import SEEDBench
from polyfocus.eval.benchmarks.synthworld import Synthworld
from polyfocus.eval.benchmarks.vqa import TextVQA, TextVQANoOCR, VizWiz, VQAv2

BENCHMARKS: dict[str, type[Benchmark]] = {cls.name: cls for cls in (
    VQAv2, GQA, GQAMCQ, VizWiz, ScienceQA, TextVQA, TextVQANoOCR, POPE, MME, MMBench, MMBenchCN, SEEDBench,
    MMVet, LLaVABench, RefCOCO, RefCOCOPlus, RefCOCOg, MMMU, Synthworld,
)}
ALIASES = {"sqa": "scienceqa", "seed": "seed_bench", "mm-vet": "mmvet", "llava_wild": "llava_bench",
           "llava-bench-in-the-wild": "llava_bench", "mmbench-cn": "mmbench_cn", "gqa-mcq": "gqa_mcq"}


def get_benchmark(name: str, data, **options) -> Benchmark:
    """An instance of the benchmark `name` over the directory `data`; options are the class's keyword arguments."""
    key = ALIASES.get(name.lower(), name.lower())
    if key not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    cls = BENCHMARKS[key]
    known = set()  # keyword options of the class and of the parents it forwards **options to
    for base in cls.__mro__:
        if "__init__" in vars(base) and base not in (Benchmark, object):
            known |= {name for name, p in inspect.signature(base.__init__).parameters.items()
                      if name not in ("self", "data") and p.kind is p.POSITIONAL_OR_KEYWORD}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"{key}: unknown option(s) {unknown}; known: {sorted(set(known))}")
    return cls(data, **options)


__all__ = ["BENCHMARKS", "Benchmark", "EvalDataError", "Row", "get_benchmark"]
