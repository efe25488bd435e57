"""DenseFusion's data engine (docs/densefusion.md): vision experts (experts/), fusion prompts (prompts.py),
captioners (captioners.py), image lists and downloads (sources.py, download.py), curation (curate.py), the engine
(engine.py, ray_engine.py), training files (export.py), synthworld inputs (synthworld.py), the CLI (cli.py)."""
