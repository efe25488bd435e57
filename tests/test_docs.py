"""The README's and the docs' examples name things that exist: the extras they install hold the modules their
snippets import, their images are the one `polyfocus demo` writes, and the demo model is evaluated on the task
families it was trained on. (Whether the demo's model answers the README's question well is the demo's business:
docs/benchmarks.md.)"""

from __future__ import annotations

import inspect
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOC_PAGES = sorted((REPO / "docs").glob("*.md"))
# The pages whose examples run against the demo's model and image.
DEMO_PAGES = [README, REPO / "docs" / "chat.md", REPO / "docs" / "serving.md", REPO / "docs" / "evaluation.md"]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
PIP_EXTRAS = re.compile(r"pip install[^\n]*?(?:-e\s+|\s)[\"']?(?:\.|polyfocus)\[([\w,-]+)\]")
IMAGE_PATH = re.compile(r"[\w./-]+\.(?:png|jpe?g)\b")
MODULE_TO_DIST = {"PIL": "pillow", "yaml": "pyyaml"}  # import names that differ from the distribution's


def project() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[;\s]", r, maxsplit=1)[0].lower().replace("-", "_") for r in requirements}


def sections(path: Path) -> list[tuple[str, str]]:
    """(heading, text) per "## " section of a README; a docs page is one section."""
    text = path.read_text()
    if path != README:
        return [(path.name, text)]
    parts = re.split(r"^## ", text, flags=re.M)
    return [(part.splitlines()[0], part) for part in parts]


def blocks(text: str, languages=None) -> list[str]:
    return [code for lang, code in FENCE.findall(text) if languages is None or lang in languages]


def demo_image() -> str:
    """What `polyfocus demo` writes beside its models: <--out default>/fresh.png."""
    from polyfocus import demo
    from polyfocus.cli.main import build_parser

    assert '"fresh.png"' in inspect.getsource(demo.ask_fresh_image)  # if this moves, so must the docs' examples
    verbs = next(a for a in build_parser()._actions if a.dest == "verb")
    return f"{verbs.choices['demo'].get_default('out')}/fresh.png"


def test_every_installed_extra_exists():
    extras = project()["optional-dependencies"]
    for page in [README, *DOC_PAGES]:
        for group in PIP_EXTRAS.findall(page.read_text()):
            for extra in group.split(","):
                assert extra in extras, f"{page.name}: pip install names the extra [{extra}], not in pyproject.toml"


@pytest.mark.parametrize("page", [README, *DOC_PAGES], ids=lambda p: p.name)
def test_snippets_import_only_what_their_install_line_installs(page):
    """A section's Python snippets import only the standard library, the core dependencies and what the extras
    installed in that section hold (the openai client needs the extra the serving section installs)."""
    meta = project()
    for heading, text in sections(page):
        installed = names(meta["dependencies"]) | {"polyfocus"}
        for group in PIP_EXTRAS.findall(text):
            for extra in group.split(","):
                installed |= names(meta["optional-dependencies"].get(extra, []))
        for code in blocks(text, {"python"}):
            for module in re.findall(r"^\s*(?:from|import)\s+(\w+)", code, re.M):
                if module in sys.stdlib_module_names:
                    continue
                dist = MODULE_TO_DIST.get(module, module).lower()
                assert dist in installed, f"{page.name} § {heading}: imports {module}, which its install line lacks"


@pytest.mark.parametrize("page", DEMO_PAGES, ids=lambda p: p.name)
def test_example_images_are_the_one_the_demo_writes(page):
    image = demo_image()
    used = [path for code in blocks(page.read_text()) for path in IMAGE_PATH.findall(code)
            if not path.endswith("loss.png")]
    assert all(path == image for path in used), f"{page.name}: {sorted(set(used) - {image})} (the demo writes {image})"


def test_the_demo_model_is_evaluated_on_the_families_it_learned():
    from polyfocus.demo import VQA_FAMILIES

    for page in DEMO_PAGES:
        for code in blocks(page.read_text()):
            if "polyfocus_demo/stage2" not in code:
                continue
            for families in re.findall(r"polyfocus synth [^\n]*--families ([\w,]+)", code):
                extra = set(families.split(",")) - set(VQA_FAMILIES)
                assert not extra, f"{page.name}: {sorted(extra)}: families the demo never trains ({VQA_FAMILIES})"
