"""Property-based fuzzing of the three readers of user files: recipes, artifact manifests and checkpoint
configs. Whatever the data, a reader either accepts it or raises DlmcError with one line; any other
exception is a bug. Each property runs a bounded number of examples (the three take ~30 s together)."""

import copy
import json
import os
import shutil
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dlmc.runtime
from dlmc.artifact import MANIFEST, read_manifest
from dlmc.summary import summarize
from dlmc.compiler import compile_model
from dlmc.errors import DlmcError
from dlmc.models import read_model_config
from dlmc.recipe import parse_recipe
from dlmc.testing.fixtures import FAMILIES, write_checkpoint

RECIPES = sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml"))
# DLMC_FUZZ_EXAMPLES=5000 for a longer hunt than the suite's.
FUZZ = settings(max_examples=int(os.environ.get("DLMC_FUZZ_EXAMPLES", 60)), deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from(["", "0", "auto", "float16", "int8", "llada", "cpu", "cuda", "eager", "a\nb", "../x"])
)
keys = st.text(max_size=10) | st.sampled_from(["backend", "dtype", "name", "passes", "shape", "decoder", "files"])
# What YAML and JSON can hold: scalars, lists and mappings, nested.
trees = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
                     max_leaves=12)


def _paths(tree, prefix=()):
    """Every place in a nested dict/list: the path of keys/indices leading to it."""
    yield prefix
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else ()
    for key, value in items:
        yield from _paths(value, prefix + (key,))


@st.composite
def mutations(draw, original):
    """`original` with a few edits: a value replaced by arbitrary data, removed, or a key added."""
    tree = copy.deepcopy(original)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(list(_paths(tree))))
        if not path:
            tree = draw(trees)
            continue
        parent = tree
        for key in path[:-1]:
            parent = parent[key]
        action = draw(st.sampled_from(["replace", "remove", "add"]))
        if action == "replace":
            parent[path[-1]] = draw(trees)
        elif action == "remove":
            del parent[path[-1]]
        elif isinstance(parent[path[-1]], dict):
            parent[path[-1]][draw(keys)] = draw(trees)
        elif isinstance(parent[path[-1]], list):
            parent[path[-1]].append(draw(trees))
    return tree


def accepted_or_one_line(call, *args):
    try:
        call(*args)
    except DlmcError as e:
        assert "\n" not in str(e) and str(e).strip(), repr(str(e))


# ---------------------------------------------------------------------------------------------
# (a) recipes
# ---------------------------------------------------------------------------------------------


@FUZZ
@given(data=trees | st.sampled_from(RECIPES).map(lambda p: yaml.safe_load(p.read_text())).flatmap(mutations))
def test_recipe_parser(data):
    accepted_or_one_line(parse_recipe, data)


# ---------------------------------------------------------------------------------------------
# (b) artifact manifests
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def artifact(checkpoints, tmp_path_factory):
    recipe = {"capture": {"max_batch": 2}, "passes": ["fold_constants"], "lower": {"backend": "eager"}}
    out = compile_model(checkpoints["llada"], parse_recipe(recipe), tmp_path_factory.mktemp("fuzz") / "art")
    mutated = shutil.copytree(out, out.parent / "mutated")  # each example rewrites its manifest
    return mutated, json.loads((out / MANIFEST).read_text())


def _read_and_load(path):
    summarize(read_manifest(path))  # what `dlmc inspect` does
    dlmc.runtime.load(path)


@FUZZ
@given(data=st.data())
def test_manifest_reader(artifact, data):
    path, manifest = artifact
    (path / MANIFEST).write_text(json.dumps(data.draw(mutations(manifest))))
    accepted_or_one_line(_read_and_load, path)


# ---------------------------------------------------------------------------------------------
# (c) checkpoint configs
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def config_dirs(tmp_path_factory):
    """One checkpoint per family whose config.json each example rewrites (the weights are never read)."""
    root = tmp_path_factory.mktemp("fuzz-configs")
    dirs = {family: write_checkpoint(family, root / family, layers=1, vocab=272) for family in FAMILIES}
    return {family: (path, json.loads((path / "config.json").read_text())) for family, path in dirs.items()}


@FUZZ
@given(family=st.sampled_from(FAMILIES), data=st.data())
def test_config_reader(config_dirs, family, data):
    path, config = config_dirs[family]
    (path / "config.json").write_text(json.dumps(data.draw(mutations(config))))
    accepted_or_one_line(read_model_config, path)
