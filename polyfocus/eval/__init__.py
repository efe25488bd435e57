"""Evaluation: the standard benchmarks scored as their references score them (docs/evaluation.md).

    from polyfocus.eval import evaluate
    evaluate("runs/stage2", "pope", "playground/data/eval/pope", out="eval_results", batch_size=8)
"""


def evaluate(*args, **kwargs):
    """polyfocus.eval.runner.evaluate (imported on first use: the benchmarks pull in the model stack)."""
    from polyfocus.eval.runner import evaluate as run

    return run(*args, **kwargs)
