import pytest
import torch

from dlmc.errors import DlmcError
from dlmc.kernels import dispatch


def test_cpu_runs_the_reference():
    assert dispatch.use_triton("cpu") is False
    assert dispatch.use_triton(torch.device("cpu")) is False


def test_cuda_runs_the_kernels_when_triton_is_there(monkeypatch):
    monkeypatch.setattr(dispatch, "triton_available", lambda: True)
    assert dispatch.use_triton("cuda") is True
    assert dispatch.use_triton("cuda:1") is True


def test_cuda_without_triton_is_one_line_error(monkeypatch):
    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    with pytest.raises(DlmcError) as e:
        dispatch.use_triton("cuda")
    assert "\n" not in str(e.value) and "triton" in str(e.value)


def test_dot_settings_keep_float32_ieee(monkeypatch):
    monkeypatch.setattr(dispatch, "interpreting", lambda: False)
    assert dispatch.dot_settings(torch.float32) == ("ieee", False)
    assert dispatch.dot_settings(torch.bfloat16) == ("tf32", False)  # ignored by tl.dot for 16-bit operands
    monkeypatch.setattr(dispatch, "interpreting", lambda: True)
    assert dispatch.dot_settings(torch.bfloat16) == ("ieee", True)  # the interpreter's bfloat16 dot is wrong
    assert dispatch.dot_settings(torch.float16) == ("tf32", False)


def test_next_power_of_2():
    assert [dispatch.next_power_of_2(n) for n in (1, 2, 3, 16, 17)] == [1, 2, 4, 16, 32]


def test_cpu_runs_the_interpreter_only_when_asked(monkeypatch):
    monkeypatch.setenv("DLMC_TRITON_CPU", "1")
    monkeypatch.setattr(dispatch, "triton_available", lambda: True)
    monkeypatch.setattr(dispatch, "interpreting", lambda: True)
    assert dispatch.use_triton("cpu") is True
    monkeypatch.setattr(dispatch, "interpreting", lambda: False)
    with pytest.raises(DlmcError, match="TRITON_INTERPRET=1"):
        dispatch.use_triton("cpu")
    monkeypatch.setenv("DLMC_TRITON_CPU", "0")
    assert dispatch.use_triton("cpu") is False
