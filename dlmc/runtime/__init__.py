"""The runtime: load a compiled artifact and generate from it.

    engine = dlmc.runtime.load("out/")
    engine.generate([[1, 2, 3]]).output_ids

It imports torch and the one backend the artifact needs; never the compiler (capture, passes,
pipeline, lower, compiler, recipe) and never transformers. tests/runtime/test_import_hygiene.py
holds it to that.
"""

from dlmc.runtime.engine import Engine, load

__all__ = ["Engine", "load"]
