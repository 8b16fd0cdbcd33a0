import pytest

from dlmc.quant.scheme import Calibration, Rule, Scheme, scheme_for


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"weights": "int4", "activations": "per_token"}, "activations: int8 activations need"),
        ({"group_size": 64, "activations": "per_tensor"}, "activations: int8 activations need"),
        ({"method": "awq", "activations": "per_token"}, "method: awq is a weight-only method"),
        ({"outliers": "smoothquant"}, "outliers: smoothquant/hadamard apply to int8 activations"),
        ({"smooth_alpha": 1.5, "activations": "per_token"}, "smooth_alpha"),
        ({"group_size": 0}, "group_size: must be >= 1"),
    ],
)
def test_bad_schemes_are_refused_with_the_field(options, message):
    with pytest.raises(ValueError, match=message):
        Scheme(**options)


def test_calibration_refuses_too_few_samples():
    with pytest.raises(ValueError, match="samples: 2 is too few"):
        Calibration(samples=2)
    with pytest.raises(ValueError, match="file: required"):
        Calibration(source="file")


def test_first_matching_rule_wins_and_null_keeps_float():
    w4, w8 = Scheme(weights="int4", group_size=32), Scheme()
    rules = (Rule(match="lm_head", scheme=None), Rule(match="layers.*.mlp.down_proj", scheme=w8),
             Rule(match="layers.*", scheme=w4))
    assert scheme_for("lm_head", rules, w4) is None
    assert scheme_for("layers.3.mlp.down_proj", rules, None) is w8
    assert scheme_for("layers.3.attn.q_proj", rules, None) is w4
    assert scheme_for("other", rules, None) is None


def test_labels():
    assert Scheme(weights="int4", group_size=64, method="gptq").label() == "W4A16 gptq g64"
    assert Scheme(activations="per_tensor", outliers="smoothquant").label() == (
        "W8A8 rtn per-channel per-tensor smoothquant(a=0.5)"
    )
