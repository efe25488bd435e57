"""The command line: `polyfocus <verb>` (main.py), `polyfocus densefusion <verb>` (densefusion.py). The top part of the
package: it may import any other, and none imports it."""

from polyfocus.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
