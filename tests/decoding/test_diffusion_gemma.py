"""The diffusion_gemma decoder: the published generate()'s arithmetic and random-number order, worked by
hand on a scripted model, batch == single on the fixture, EOS padding, and the CLI."""

import torch
import pytest

from dlmc.decoding import DECODERS, default_decoder
from dlmc.decoding.diffusion_gemma import DiffusionGemmaConfig, accept, generate, temperature
from dlmc.errors import DlmcError
from dlmc.models import load_model
from dlmc.models.diffusion_gemma import GemmaCache
from dlmc.spec import DenoiserSpec
from dlmc.testing.gemma_fixtures import write_gemma_checkpoint

V, C = 6, 3


class Scripted(torch.nn.Module):
    """Logits that put all weight on token (position + step) % V ... scaled by `sharp`; records calls."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits  # callable(call index) -> [C, V]
        self.embed_tokens = torch.nn.Embedding(V, 2)
        self.arch = type("A", (), {"canvas_length": C})
        self.calls = 0
        self.seen = []

    def empty_cache(self, batch, device):
        z = torch.zeros(batch, 0, dtype=torch.long)
        return GemmaCache([], [], z.bool(), z)

    def encode(self, ids, mask, positions, cache):
        return cache

    def denoise(self, canvas, positions, cache, sc):
        self.seen.append(canvas.clone())
        out = self.logits(self.calls).expand(canvas.shape[0], C, V)
        self.calls += 1
        return out


SPEC = DenoiserSpec(family="diffusion_gemma", mask_token_id=None, attention="bidirectional", block_size=None,
                    shift_logits=False, vocab_size=V, max_length=64, eos_token_id=1, pad_token_id=0)


def test_acceptance_keeps_the_low_entropy_prefix():
    # sorted: 0.0, 0.05, 0.07, 0.2 -> cumsum - current: 0, 0.0, 0.05, 0.12 -> first three pass a 0.1 bound
    assert accept(torch.tensor([0.2, 0.05, 0.0, 0.07]), 0.1).tolist() == [False, True, True, True]


def test_temperature_is_the_linear_schedule_in_fp32():
    config = DiffusionGemmaConfig(max_denoising_steps=4)
    assert float(temperature(config, 4)) == pytest.approx(0.8) and temperature(config, 4).dtype == torch.float32
    assert float(temperature(config, 1)) == pytest.approx(0.5)


def test_random_numbers_follow_the_reference_order():
    """Hand-worked: peaked logits (accepted, entropy ~0) for two steps; the draws are replayed from a
    global-seeded stream in the reference's order: randint canvas, then per step multinomial + randint."""
    peak = torch.full((C, V), -50.0)
    peak[:, 4] = 50.0  # every position certain of token 4
    model = Scripted(lambda call: peak)
    config = DiffusionGemmaConfig(max_new_tokens=2 * C, max_denoising_steps=3, stability_threshold=1,
                                  eos_token_ids=(5,))
    out = generate(model, SPEC, [[2, 3]], config, seed=7)
    # step 1 never stable; step 2 stable and confident -> 2 passes per canvas, argmax committed
    assert out.output_ids == [[4] * 6] and out.nfe == 4
    # the stream: after these draws, the generator is where the reference's global one would be
    torch.manual_seed(7)
    for _ in range(2):
        torch.randint(0, V, (1, C))
        for _ in range(2):
            torch.multinomial(torch.softmax(peak / 0.8, -1), 1)
            torch.randint(0, V, (1, C))
    expected_next = torch.rand(1)
    g = torch.Generator().manual_seed(7)
    for _ in range(2):
        torch.randint(0, V, (1, C), generator=g)
        for _ in range(2):
            torch.multinomial(torch.softmax(peak / 0.8, -1), 1, generator=g)
            torch.randint(0, V, (1, C), generator=g)
    assert torch.equal(torch.rand(1, generator=g), expected_next)


def test_unaccepted_positions_are_renoised_from_the_stream():
    """Position 1 is certain (entropy 0, accepted); 0 and 2 are uniform (entropy log 6 > bound: renoised).
    The canvases the model sees are replayed from torch.manual_seed(3) in the reference's order."""
    logits = torch.zeros(C, V)
    logits[1, 5] = 100.0
    model = Scripted(lambda call: logits)
    config = DiffusionGemmaConfig(max_new_tokens=C, max_denoising_steps=3)
    out = generate(model, SPEC, [[2]], config, seed=3)
    assert out.output_ids == [[0, 5, 0]] and out.nfe == 3  # argmax committed; never confident
    torch.manual_seed(3)
    expected = [torch.randint(0, V, (1, C))]
    for step in (3, 2):
        probs = torch.softmax(logits / temperature(config, step), -1, dtype=torch.float32)
        sampled = torch.multinomial(probs, 1).view(1, C)
        fresh = torch.randint(0, V, (1, C))
        expected.append(torch.where(torch.tensor([[False, True, False]]), sampled, fresh))
    assert [c.tolist() for c in model.seen] == [e.tolist() for e in expected]


def test_eos_pads_the_rest_and_ends_the_row():
    logits = torch.full((C, V), -50.0)
    logits[0, 3], logits[1, 1], logits[2, 4] = 50.0, 50.0, 50.0  # 3, EOS, 4
    model = Scripted(lambda call: logits)
    out = generate(model, SPEC, [[2]], DiffusionGemmaConfig(max_new_tokens=2 * C, max_denoising_steps=4), seed=0)
    assert out.output_ids == [[3, 1, 0, 0, 0, 0]] and out.nfe == 2  # no second canvas


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_model(write_gemma_checkpoint(tmp_path_factory.mktemp("g"), dtype=torch.float64))


def test_batch_equals_single_on_the_fixture(model):
    # float64 weights: a draw could only flip between batch and single on a rounding-size tie
    prompts = [[2, 10, 11], [2, 12, 13, 14, 15, 16, 17]]
    config = DiffusionGemmaConfig(max_new_tokens=16, max_denoising_steps=5)
    batched = generate(model, model.spec, prompts, config, seed=5)
    for prompt, row, nfe in zip(prompts, batched.output_ids, batched.row_nfe, strict=True):
        single = generate(model, model.spec, [prompt], config, seed=5)
        assert single.output_ids == [row] and single.row_nfe == [nfe]


def test_registered_as_the_family_default(model):
    assert default_decoder(model.spec) == "diffusion_gemma" and "diffusion_gemma" in DECODERS


def test_other_decoders_are_refused(model):
    with pytest.raises(DlmcError, match="runs only with its own decoder"):
        model(torch.zeros(1, 3, dtype=torch.long))


def test_bad_settings_are_one_line():
    with pytest.raises(DlmcError, match="t_min=0.8, t_max=0.4"):
        DiffusionGemmaConfig(t_min=0.8, t_max=0.4)
