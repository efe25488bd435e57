"""`python -m polyfocus.cli ...` (what `accelerate launch -m polyfocus.cli` and `torchrun -m polyfocus.cli` run)."""

import sys

from polyfocus.cli import main

main(sys.argv[1:])
