"""devices.py: the device and dtype choice, on GPUs of every compute capability (mocked: the capability is
what the choice reads), and the CLIs that share it."""
import pytest
import torch

import devices
from errors import UserError


@pytest.mark.parametrize("capability,default", [((7, 0), torch.float32), ((7, 5), torch.float32),
                                                ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)])
def test_bfloat16_only_from_ampere_on(monkeypatch, capability, default):
    """Default: bfloat16 from compute capability 8.0 on, float32 below (V100 7.0, T4 7.5); an explicit
    --dtype bfloat16 below 8.0 is one UserError naming the flag and the capability; float32 anywhere."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cuda = torch.device("cuda", 0)
    assert devices.choose_dtype(None, cuda) == default
    assert devices.choose_dtype("float32", cuda) == torch.float32
    if default == torch.bfloat16:
        assert devices.choose_dtype("bfloat16", cuda) == torch.bfloat16
    else:
        with pytest.raises(UserError, match=rf"^--dtype bfloat16: cuda:0 has compute capability "
                                            rf"{capability[0]}\.{capability[1]}.*use --dtype float32$"):
            devices.choose_dtype("bfloat16", cuda)


def test_cpu_and_planned_dtypes(monkeypatch):
    """The CPU never asks CUDA for a capability; a CUDA device on a machine without CUDA (--dry-run's
    plan) counts as Ampere or newer: bfloat16 by default."""
    def no_gpu(device=None):
        raise AssertionError("asked CUDA")
    monkeypatch.setattr(torch.cuda, "get_device_capability", no_gpu)
    assert devices.choose_dtype(None, torch.device("cpu")) == torch.float32
    assert devices.choose_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert devices.choose_dtype(None, torch.device("cuda")) == torch.bfloat16
    assert devices.choose_dtype("float32", torch.device("cuda")) == torch.float32
