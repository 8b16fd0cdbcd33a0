"""A compiled DiffusionGemma artifact (encoder program + decoder iteration fused with the sampler) gives the
reference decoder's tokens at batch 1 and 2, on eager, AOTInductor and ONNX Runtime, from `dlmc compile`
with the generic recipes (fp32 fixture).

Token identity between two computations of the same maths holds only where every decision clears the
drift between them. Self-conditioning feeds each step's logits into the next, so rounding drift grows with
the steps (about 3x per step on the random fixture: 1e-6 at the first, 1e-3 by the seventh), which is why
the runs are three steps long per canvas (two canvases, so the encoder also runs on a committed canvas),
and `SamplerMargins` checks each decision's margin over the drift three steps can reach."""

import json

import pytest
import torch

import dlmc.runtime
from dlmc.compiler import compile_model
from dlmc.runtime.backends import load_step
from dlmc.runtime.engine import Engine
from dlmc.runtime.gemma_loop import GemmaPrograms
from dlmc.runtime.weights import WeightFiles
from dlmc.decoding.diffusion_gemma import DiffusionGemmaConfig, entropy, generate, temperature
from dlmc.models import load_model
from dlmc.testing.gemma_fixtures import write_gemma_checkpoint

PROMPTS = [[2, 10, 11, 12, 13, 14, 15], [2, 20, 21]]  # the second is left-padded in a batch
CONFIG = DiffusionGemmaConfig(max_new_tokens=16, max_denoising_steps=3, eos_token_ids=(159,))
SEED = 1
MARGIN = 1e-4
"""Smallest gap a decision must clear: the eager fp32 logits of a row move by < 2e-5 over three steps
between batch 1 and batch 2 (different kernel blocking), and as much between backends."""
# AOTInductor compiles two programs here (~1.5 min): `pytest -m slow` runs it
BACKENDS = ("eager", pytest.param("inductor", marks=pytest.mark.slow), "onnxrt")


class SamplerMargins(torch.nn.Module):
    """The eager model wrapped to record how far each sampler decision of the reference run is from a
    tie. It replays each row's draws (every row runs every step: the test checks row_nfe) to see the
    sample argmax(probs / q): its relative top-2 gap; the argmax's top-2 logit gap; the gaps between
    sorted entropies and between the acceptance sums and the bound; the mean entropy against the stop
    threshold."""

    def __init__(self, model, batch: int):
        super().__init__()
        self.model, self.arch, self.spec, self.embed_tokens = model, model.arch, model.spec, model.embed_tokens
        self.generators = [torch.Generator().manual_seed(SEED) for _ in range(batch)]
        self.step = 0
        self.gaps = {"sample": 1.0, "argmax": 1.0, "entropy order": 1.0, "bound": 1.0, "stop": 1.0}

    def empty_cache(self, batch, device):
        return self.model.empty_cache(batch, device)

    def encode(self, *args):
        C, V = self.arch.canvas_length, self.spec.vocab_size
        for g in self.generators:  # the next canvas's initial noise
            torch.randint(0, V, (1, C), generator=g)
        self.step = 0
        return self.model.encode(*args)

    def denoise(self, canvas, positions, cache, sc_logits=None):
        raw = self.model.denoise(canvas, positions, cache, sc_logits)  # [B, C, V]
        processed = raw.float() / temperature(CONFIG, CONFIG.max_denoising_steps - self.step)
        self.step += 1
        C, V = canvas.shape[1], self.spec.vocab_size
        for b, g in enumerate(self.generators):
            q = torch.empty(C, V).exponential_(1, generator=g)
            torch.randint(0, V, (1, C), generator=g)
            ratio = (torch.softmax(processed[b], -1) / q).topk(2, -1).values  # [C, 2]
            self._gap("sample", ((ratio[:, 0] - ratio[:, 1]) / ratio[:, 0]).min())
            top2 = processed[b].topk(2, -1).values
            self._gap("argmax", (top2[:, 0] - top2[:, 1]).min())
            ordered = entropy(processed[b]).sort().values  # [C]
            self._gap("entropy order", ordered.diff().min())
            self._gap("bound", (ordered.cumsum(-1) - ordered - CONFIG.entropy_bound).abs().min())
            self._gap("stop", (ordered.mean() - CONFIG.confidence_threshold).abs())
        return raw

    def _gap(self, name, value):
        self.gaps[name] = min(self.gaps[name], float(value))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_gemma_checkpoint(tmp_path_factory.mktemp("gemma"))


@pytest.fixture(scope="module")
def references(checkpoint):
    model = load_model(checkpoint)
    runs = {}
    for batch in (1, 2):
        recorder = SamplerMargins(model, batch)
        with torch.no_grad():
            runs[batch] = generate(recorder, model.spec, PROMPTS[:batch], CONFIG, seed=SEED)
        assert runs[batch].row_nfe == [6] * batch  # every row ran every step: the replay saw its draws
        assert all(gap > MARGIN for gap in recorder.gaps.values()), recorder.gaps
    return runs


@pytest.fixture(scope="module")
def artifacts(checkpoint, tmp_path_factory):
    """backend -> its compiled artifact, compiled once for the tests that use it."""
    cache = {}

    def get(backend):
        if backend not in cache:
            out = tmp_path_factory.mktemp("artifacts") / backend
            cache[backend] = compile_model(checkpoint, f"recipes/cpu-{backend}.yaml", out)
        return cache[backend]

    return get


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_artifact_gives_the_reference_tokens(artifacts, references, backend):
    engine = dlmc.runtime.load(artifacts(backend))
    assert engine.signature.fused_decoder == "diffusion_gemma"
    for batch, reference in references.items():
        got = engine.generate(PROMPTS[:batch], config=CONFIG, seed=SEED)
        assert got.output_ids == reference.output_ids and got.row_nfe == reference.row_nfe, (backend, batch)


@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_the_two_programs_share_one_copy_of_the_weights(artifacts, backend):
    """One weights file on disk; loaded, both programs point into the same tensors, and a change made in
    place to a shared tensor reaches both (so neither kept a copy of its own)."""
    root = artifacts(backend)
    manifest = json.loads((root / "manifest.json").read_text())
    assert [name for name in manifest["files"] if name.endswith(".safetensors")] == ["weights.safetensors"]
    weights = WeightFiles()
    encoder = load_step(root, manifest["programs"]["encoder"]["backend"], "cpu", weights)
    decoder = load_step(root, manifest["backend"], "cpu", weights)
    shared = set(encoder.weights) & set(decoder.weights)
    assert "model.embed_tokens.weight" in shared and len(shared) > 10
    assert all(encoder.weights[n].data_ptr() == decoder.weights[n].data_ptr() for n in shared)

    programs = GemmaPrograms(Engine(root, manifest, decoder, torch.device("cpu"), encoder))
    ids = torch.tensor([PROMPTS[0]])  # [1, P]
    mask, positions = torch.ones_like(ids, dtype=torch.bool), torch.arange(ids.shape[1])[None]
    cache = programs.encode(ids, mask, positions, programs.empty_cache(1))
    C, V = programs.canvas, manifest["spec"]["vocab_size"]
    canvas = torch.randint(0, V, (1, C), generator=torch.Generator().manual_seed(0))  # [1, C]
    decode_inputs = (canvas, ids.shape[1] + torch.arange(C)[None], cache,
                     torch.zeros(1, C, programs.hidden), torch.tensor([1.0]), torch.tensor([1.0]),
                     torch.ones(1, C, V), torch.zeros(1, C, dtype=torch.long))

    def run():
        with torch.no_grad():
            keys = programs.encode(ids, mask, positions, programs.empty_cache(1)).keys  # per layer [1, Hkv, S, D]
            soft = programs.decode(*decode_inputs)[3]  # [1, C, hidden]
        return torch.cat([k.flatten() for k in keys]), soft.clone()

    keys, soft = run()
    embedding = weights.tensors(root / "weights.safetensors", "cpu")["model.embed_tokens.weight"]
    embedding.add_(torch.randn(embedding.shape, generator=torch.Generator().manual_seed(1)))
    new_keys, new_soft = run()
    assert (new_keys - keys).abs().max() > 1e-2 and (new_soft - soft).abs().max() > 1e-2
