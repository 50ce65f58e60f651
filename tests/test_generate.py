"""generate.py: chunked prefill, greedy decoding against transformers' generate, sampling, stop ids, CLI.

Tolerance: float32 logits of an identical computation differ only by summation order, so 1e-5 absolute
on logits of magnitude ~1 (tiny random models); greedy ids must match exactly.
"""
import pytest
import torch

from checkpoint import load_model
from helpers import hf_llama
from generate import generate, main, prefill
from tokenizer import load_tokenizer

TOL = 1e-5


def tokens(n=24, vocab=128, batch=2, seed=0):
    return torch.randint(0, vocab, (batch, n), generator=torch.Generator().manual_seed(seed))


def test_chunked_prefill_equals_one_shot():
    model = load_model("tiny").eval()
    x = tokens(100, vocab=512, batch=1)[0]
    model.setup_caches(1, 100)
    one = prefill(model, x)
    model.setup_caches(1, 100)
    chunked = prefill(model, x, chunk=7)
    model.clear_caches()
    assert (one - chunked).abs().max() < TOL


def test_greedy_generation_matches_transformers(tmp_path):
    hf, d = hf_llama(tmp_path, num_attention_heads=4, num_key_value_heads=2)
    ours = load_model(str(d))
    prompt = tokens(12, batch=1)
    ref = hf.generate(prompt, max_new_tokens=16, do_sample=False, min_new_tokens=16, eos_token_id=None,
                      pad_token_id=0)[0, 12:].tolist()
    assert generate(ours, prompt[0], 16, prefill_chunk=5) == ref


def test_sampling_is_reproducible_and_top_p_one_token_is_greedy():
    model = load_model("tiny")
    p = list(range(5))
    a = generate(model, p, 8, temperature=1.0, generator=torch.Generator().manual_seed(3))
    b = generate(model, p, 8, temperature=1.0, generator=torch.Generator().manual_seed(3))
    assert a == b
    # top_p tiny keeps only the most likely token: equals greedy
    assert generate(model, p, 8, temperature=1.0, top_p=1e-9) == generate(model, p, 8)


def test_stop_ids_end_generation():
    model = load_model("tiny")
    first = generate(model, [1, 2, 3], 1)[0]
    assert generate(model, [1, 2, 3], 10, stop_ids=[first]) == [first]


def test_cli_error_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--model", str(tmp_path / "nope"), "--prompt", "hi"])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.count("\n") == 1 and "nope" in err and err.startswith("error: ")


@pytest.mark.slow
def test_cli_continues_a_prompt_greedily(smollm2_path, capsys):
    """`python generate.py` prints the prompt and the greedy continuation that generate() produces."""
    main(["--model", smollm2_path, "--prompt", "The capital of France is", "--max-new-tokens", "4"])
    out = capsys.readouterr().out
    tok = load_tokenizer(smollm2_path)
    model = load_model(smollm2_path, dtype=torch.float32)
    ids = generate(model, tok.encode("The capital of France is", bos=True), 4, stop_ids=tok.eos_id)
    assert out == "The capital of France is" + tok.decode(ids) + "\n"


def test_cli_chooses_device_and_dtype_as_eval_does(tmp_path, capsys):
    """--device/--dtype (devices.add_device_flags, eval.py's flags): --dtype bfloat16 on the CPU prints the
    continuation of the model loaded in bfloat16, which differs from float32's here (the check can fail)."""
    from checkpoint import save_model
    from tokenizer import BYTE_VOCAB_SIZE, save_tokenizer
    folder = tmp_path / "tiny"
    save_model(load_model("tiny", vocab_size=BYTE_VOCAB_SIZE, seed=5), folder)  # a seed whose bf16 run differs
    save_tokenizer("bytes", folder)
    tok, prompt = load_tokenizer(str(folder)), "def main():"
    want = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = load_model(str(folder), dtype=dtype)
        want[dtype] = prompt + tok.decode(generate(model, tok.encode(prompt, bos=True), 24, stop_ids=tok.eos_id)) + "\n"
    main(["--model", str(folder), "--prompt", prompt, "--max-new-tokens", "24", "--device", "cpu", "--dtype", "bfloat16"])
    assert capsys.readouterr().out == want[torch.bfloat16] != want[torch.float32]
