"""Wall time and peak memory of `polyfocus demo` (defaults), with its colour/shape accuracy: one JSON line.

No same-process reference exists for a whole pipeline, so this is an absolute figure; targets: total <= 600 s on
2 cores, colour and shape accuracy >= 0.80 on the held-out scenes.
"""

from __future__ import annotations

import contextlib
import io
import sys
import tempfile

from common import emit
from polyfocus.demo import run


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        summary = run(out=tmp)
    acc = summary["accuracy"]
    emit({"bench": "demo", **summary["timings_s"], "peak_rss_mb": summary["peak_rss_mb"],
          "colour": round(acc["colour"], 3), "shape": round(acc["shape"], 3), "all": round(acc["all"], 3),
          "targets_met": summary["timings_s"]["total_s"] <= 600 and min(acc["colour"], acc["shape"]) >= 0.8})


if __name__ == "__main__":
    main(*sys.argv[1:])
