"""gguf_read.py: llama.cpp's block dequantization, the q/k row permutation, the file opener's errors, the
embedded tokenizer's refusals, and the real SmolLM2 GGUF against transformers' GGUF loader.

Tolerances: block dequantization and the permutations are the same float32 operations or pure index
moves, so exact. The SmolLM2 test allows 1e-3 on logits: 30 layers of float32 reordering on real weights
with logits of magnitude ~20; greedy tokens must match exactly.
"""
from pathlib import Path

import pytest
import torch

from checkpoint import load_model
from errors import UserError
from generate import generate
from gguf_read import dequantize_gguf_block, open_gguf, permute_qk, read_gguf_tokenizer, unpermute_qk


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "Q4_1"])
def test_gguf_block_dequant_matches_gguf_package(kind):
    gguf = pytest.importorskip("gguf")
    from gguf import quants

    w = torch.randn(6, 96, generator=torch.Generator().manual_seed(0)).numpy()
    q = quants.quantize(w, gguf.GGMLQuantizationType[kind])
    ref = torch.from_numpy(quants.dequantize(q, gguf.GGMLQuantizationType[kind]).copy())
    got = dequantize_gguf_block(torch.from_numpy(q.copy()), kind)
    assert torch.equal(got, ref)  # the same float32 operations: exact


def test_unpermute_inverts_llama_cpp_permute():
    n_heads, hd, dim = 3, 8, 5
    w = torch.randn(n_heads * hd, dim)
    # llama.cpp's convert script: reshape(n_head, 2, hd // 2, ...).swapaxes(1, 2)
    permuted = w.reshape(n_heads, 2, hd // 2, dim).transpose(1, 2).reshape(w.shape)
    assert torch.equal(permute_qk(w, n_heads), permuted)
    assert torch.equal(unpermute_qk(permuted, n_heads), w)
    assert not torch.equal(permuted, w)  # the permutation moves rows, so the checks above can fail


def test_unreadable_files_are_one_user_error(tmp_path):
    pytest.importorskip("gguf")
    with pytest.raises(UserError, match="nowhere.gguf: no such GGUF file"):
        open_gguf(tmp_path / "nowhere.gguf")
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(UserError, match="bad.gguf: not a readable GGUF file"):
        open_gguf(tmp_path / "bad.gguf")


def test_sentencepiece_vocabulary_is_refused(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "spm.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("llama")  # llama.cpp's name for a SentencePiece vocabulary
    w.add_token_list(["<unk>", "<s>", "</s>"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UserError, match="spm.gguf: tokenizer.ggml.model is 'llama'"):
        read_gguf_tokenizer(path)


@pytest.mark.slow
def test_smollm2_gguf_matches_transformers(smollm2_path):
    transformers = pytest.importorskip("transformers")
    p = Path(smollm2_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, torch_dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)
    ours = load_model(str(p), dtype=torch.float32).eval()
    assert ours.config.n_heads == 9 and ours.config.n_kv_heads == 3 and ours.config.tie_embeddings
    ids = tok("The capital of France is Paris. The capital of Germany is", return_tensors="pt").input_ids
    with torch.no_grad():
        diff = (hf(ids).logits - ours(ids)).abs().max().item()
    assert diff <= 1e-3, diff
    ref = hf.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:].tolist()
    assert generate(ours, ids[0], len(ref), prefill_chunk=4)[:len(ref)] == ref
