import pytest
import torch

from dlmc.errors import DlmcError
from dlmc.generation import default_model_dir
from dlmc.models import load_model
from dlmc.quant.calibration import LayerStats, calibration_inputs
from dlmc.quant.scheme import Calibration


@pytest.fixture(scope="module")
def spec():
    return load_model(default_model_dir()).spec


def test_task_calibration_looks_like_denoising_states(spec):
    batches = calibration_inputs(Calibration(samples=10, batch_size=4, seq_len=48), spec, default_model_dir(), 256)
    assert [b[0].shape for b in batches] == [(4, 48), (4, 48), (2, 48)]
    ids = torch.cat([b[0] for b in batches])
    masked = ids == spec.mask_token_id
    assert masked.any() and not masked.all()
    assert not masked[:, 0].any()  # prompts are never masked
    assert all(b[1].all() for b in batches)


def test_file_calibration_and_its_errors(spec, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("add 12+34:\n\nreverse abcdefghij:\ncount 100:\nshift abcdefghij:\n")
    config = Calibration(source="file", file=str(prompts), samples=4)
    batches = calibration_inputs(config, spec, default_model_dir(), 256)
    assert sum(b[0].shape[0] for b in batches) == 4
    with pytest.raises(DlmcError, match=r"has 4 prompts, calibration.samples asks for 8"):
        calibration_inputs(Calibration(source="file", file=str(prompts), samples=8), spec, default_model_dir(), 256)
    with pytest.raises(DlmcError, match="file not found"):
        missing = Calibration(source="file", file=str(tmp_path / "nope"), samples=4)
        calibration_inputs(missing, spec, default_model_dir(), 256)


def test_tasks_need_a_tokenizer_random_does_not(spec, tmp_path):
    with pytest.raises(DlmcError, match="needs the checkpoint's tokenizer"):
        calibration_inputs(Calibration(samples=4, source="file", file=__file__), spec, tmp_path, 256)
    batches = calibration_inputs(Calibration(source="random", samples=4, seq_len=16), spec, tmp_path, 256)
    assert batches[0][0].shape == (4, 16) and batches[0][0].max() < spec.vocab_size


def test_tasks_are_the_embedded_models_only(checkpoints):
    """Any other checkpoint is refused the toy tasks, in one line naming the way out; its default is
    self, sequences the model writes (seeded: the same set each time), partly masked after the prompt."""
    model = load_model(checkpoints["llada"])
    message = r"^quantize.calibration.source: tasks are the embedded model's .* use source: file .* or source: self"
    with pytest.raises(DlmcError, match=message):
        calibration_inputs(Calibration(source="tasks", samples=4), model.spec, checkpoints["llada"], 256, model=model)
    config = Calibration(samples=4, seq_len=16, batch_size=2)
    batches = calibration_inputs(config, model.spec, checkpoints["llada"], 256, model=model)
    again = calibration_inputs(config, model.spec, checkpoints["llada"], 256, model=model)
    assert all(torch.equal(x, y) for b, c in zip(batches, again, strict=True) for x, y in zip(b, c, strict=True))
    ids = torch.cat([b[0] for b in batches])  # [4, 16]
    assert ids.shape == (4, 16) and not (ids[:, :4] == model.spec.mask_token_id).any()
    assert (ids[:, 4:] == model.spec.mask_token_id).any() and (ids[:, 4:] != model.spec.mask_token_id).any()
    with pytest.raises(DlmcError, match="self samples from the model, and none was given"):
        calibration_inputs(config, model.spec, checkpoints["llada"], 256)
    assert calibration_inputs(Calibration(samples=4), model.spec, default_model_dir(), 256)  # tasks, by default


def test_outlier_statistics():
    stats = LayerStats()
    x = torch.ones(4, 10, 8)
    x[..., 2] = 50  # channel outlier
    x[0, 3, 5] = 400  # one massive activation on one token
    stats.add(x, keep=5, generator=torch.Generator().manual_seed(0), hessian=True)
    out = stats.outliers()
    assert out["absmax"] == 400 and out["channel_absmax_median"] == 1
    assert out["outlier_channels"] == 2  # channels 2 and 5 exceed 6x the median channel
    assert out["massive_token_fraction"] == pytest.approx(1 / 40)
    assert stats.rows_kept().shape == (5, 8)
    torch.testing.assert_close(stats.hessian(), 2 * x.reshape(-1, 8).T @ x.reshape(-1, 8) / 40)
