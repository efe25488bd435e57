"""bench/ holds scripts, not a package: the tests load a script as a module by its path."""

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).parent.parent / "bench"


def load_bench_script(name: str):
    """bench/<name>.py, executed as a fresh module; bench/ goes on sys.path, as when the script runs (scripts import
    their siblings, e.g. `from common import emit`)."""
    if str(BENCH) not in sys.path:
        sys.path.append(str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
