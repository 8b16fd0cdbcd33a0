"""The runtime imports torch and the one backend its artifact needs: never the compiler, never
transformers, never another backend's package. Checked in a fresh interpreter."""

import subprocess
import sys
from dataclasses import replace

import pytest

from dlmc.compiler import compile_model
from dlmc.lower.eager import EagerSettings
from dlmc.recipe import DecodeDefaults, Recipe, load_recipe
from tests.test_compiler import RECIPES

COMPILER = ["dlmc.capture", "dlmc.passes", "dlmc.pipeline", "dlmc.lower", "dlmc.compiler", "dlmc.recipe"]
NEVER = [*COMPILER, "transformers", "torch_tensorrt"]


def modules_after(code: str) -> set[str]:
    script = f"import sys\n{code}\nprint('\\n'.join(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return set(result.stdout.split())


def imported(modules: set[str], name: str) -> bool:
    return any(m == name or m.startswith(name + ".") for m in modules)


def test_importing_the_runtime_pulls_in_no_compiler_and_no_backend():
    modules = modules_after("import dlmc.runtime")
    for name in [*NEVER, "onnxruntime", "onnx", "torch._inductor"]:
        assert not imported(modules, name), name


@pytest.fixture(scope="module")
def artifacts(checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("hygiene")
    decode = DecodeDefaults(decoder="dream", config={"max_new_tokens": 4, "steps": 2})
    eager = Recipe(lower=EagerSettings(), decode=decode)
    onnx = replace(load_recipe(RECIPES / "cpu-onnxrt.yaml"), decode=decode)
    eager = compile_model(checkpoints["dream"], eager, root / "eager")
    onnx = compile_model(checkpoints["dream"], onnx, root / "onnx")
    return {"eager": eager, "onnxrt": onnx}


@pytest.mark.parametrize("backend", ["eager", "onnxrt"])
def test_running_an_artifact_imports_only_its_backend(artifacts, backend):
    modules = modules_after(
        f"import dlmc.runtime\nengine = dlmc.runtime.load({str(artifacts[backend])!r})\n"
        "print(engine.generate([[5, 6, 7]]).output_ids, file=sys.stderr)"
    )
    for name in NEVER:
        assert not imported(modules, name), name
    assert imported(modules, "onnxruntime") == (backend == "onnxrt")
    assert not imported(modules, "onnx")  # onnxruntime alone runs the model
