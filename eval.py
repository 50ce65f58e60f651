"""Long-context evaluation: perplexity by length and three recall probes (passkey, needle, JSON key-value).

Perplexity alone does not show whether a model *uses* a long context: a model can predict the next token
from the last few hundred tokens and still reach a low perplexity at 16K (Gao et al. 2024, "How to Train
Long-Context Language Models (Effectively)"). So perplexity goes with synthetic
recall, where the answer is only in the distant context:

    ppl      PPL(L) = exp( (1 / N) sum_t -log p(x_t | x_<t) ) over N scored positions of windows of length L
             cut from one EOS-joined token stream (Chen et al. 2023, "Position Interpolation", sec. 3.2;
             with --stride S each window scores only its last S tokens, as in the sliding evaluation there).
    passkey, needle, kv  synthetic recall with the answer only in the distant context, greedy decoding,
             exact match (and ROUGE-L recall for needle); prompts and scorers in eval_tasks.py. `--protocol`
             builds and scores them as a paper's code does (needle: llama3-80k, kamradt; kv: helmet;
             eval_protocols.py), on the protocol's own grid unless --lengths/--depths say otherwise.
    harness  lm-evaluation-harness tasks (--tasks mmlu, ...) on the model as loaded here (eval_harness.py).
             `passkey --format code` is the built-in demo's probe (byte-level models): held-out stdlib code
             with a `K$NNNN` fact at a random depth, queried by `K$`; --trials prompts per length from the
             RNG stream --seed, as demo.py draws them (its table uses --seed 987654321, 40 trials).

Depth in [0, 1] is the fraction of the context tokens that come before the probe.

Short-context retention (Gao et al. 2024: also evaluate short-context task performance): with several rows,
every table ends with `retained@N`, each row's score at N (--base-length, the base's own context; default the
shortest length) against the first row's, oriented so that 1 = kept and above 1 = better for every task:
ppl_first / ppl_row for perplexity, accuracy_row / accuracy_first for the probes. Give the base first.

Examples (SMOL=the SmolLM2-135M-Instruct GGUF; see tests/conftest.py):
    python eval.py ppl --model $SMOL --lengths 2048,8192,16384 --rope default --rope yarn:2 --rope dynamic:2
    python eval.py passkey --model $SMOL --lengths 2048,4096,8192 --depths 0,0.5,1 --trials 2
    python eval.py needle --model $SMOL --lengths 2048,4096 --out /tmp/evalruns/needle
    python eval.py needle --protocol llama3-80k --model $SMOL --haystack PaulGrahamEssays/ --lengths 8000
    python eval.py harness --model $SMOL --tasks longctx_mc --include-path tests/harness_tasks --out /tmp/h
    python eval.py kv --model tiny --model out/merged --adapter none --adapter none --lengths 512
    python eval.py ruler --model $SMOL --lengths 4096 --samples quick   # RULER's 13 tasks (eval_ruler.py, docs/evaluation.md)
    python eval.py passkey --format code --model demo --adapter runs/demo/train/adapter --quant nf4 \
        --rope yarn:16 --lengths 256,1280,2560 --trials 40 --seed 987654321     # the demo's passkey column

Notation: T tokens of a window or prompt, L requested length, L0 the model's original context, s RoPE
factor, C model dim, V vocab.

Note: dynamic NTK rescales RoPE for the current length, so chunked prefill would rotate early chunks'
    keys with a different base from later ones. Every sequence here has a known final length L, so a
    `dynamic:s` setting is evaluated as the fixed NTK base change it equals for one pass over L tokens
    (s_eff = s L / L0 - (s - 1); plain RoPE when L <= L0). Results record the settings actually used.
"""
from __future__ import annotations

import memory_alloc

if __name__ == "__main__":  # a command: re-executes once with the CPU allocator preloaded, before torch loads
    memory_alloc.return_freed_memory(as_command=True)

import argparse
import json
import math
import random
import subprocess
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import eval_harness
import eval_protocols
import rope
import eval_ruler
from checkpoint import load_model, read_config
from devices import add_device_flags, device_and_dtype
from errors import UserError, check_range, run_cli
from eval_report import label, markdown_table, plot, retention, ruler_table
from generate import check_memory, generate
from lora_peft import load_adapter
from loss import chunked_cross_entropy
from model import PRESETS, Transformer
from outputs import atomic_write_text, check_output
from eval_tasks import (END_OF_TURN, KEY_DIGITS, NEEDLE, QUESTION, code_passkey_items, corpus_bytes, document_texts,
                   haystack_text, kv_prompt, needle_prompt, passkey_correct, passkey_prompt,
                   sentence_starts, stdlib_files, stdlib_split, stdlib_texts, token_stream, windows)
from tokenizer import chat_template_for, load_tokenizer

# ----------------------------------------------------------------------------- constants

TASKS = ("ppl", "passkey", "needle", "kv", "ruler", "harness")
FORMATS = ("text", "code")  # passkey prompts: the filler-text probe, or the demo's code probe (eval_tasks.py)
DEFAULT_DEPTHS = "0,0.25,0.5,0.75,1"
MAX_ITEMS = 10**5  # --trials, --windows: per length (every item is a generation or a forward pass)
PROBE_NEW_TOKENS = 256  # tokens a probe's answer may take, counted in the memory check (the tasks ask for fewer)

# ----------------------------------------------------------------------------- pure functions: parsing


def parse_ints(text: str, flag: str, minimum: int = 1) -> list[int]:
    """'2048,8192' -> [2048, 8192]; UserError naming `flag` on a bad or too-small value."""
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{flag} {text!r}: expected comma-separated integers, e.g. 2048,8192") from None
    if not out or min(out) < minimum:
        raise UserError(f"{flag} {text!r}: every value must be an integer >= {minimum}")
    return out


def parse_depths(text: str) -> list[float]:
    try:
        out = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--depths {text!r}: expected comma-separated fractions, e.g. 0,0.5,1") from None
    if not out or not all(0.0 <= depth <= 1.0 for depth in out):
        raise UserError(f"--depths {text!r}: every depth must lie in [0, 1]")
    return out


def fixed_rope(theta: float, scaling: dict | None, length: int) -> dict | None:
    """The scaling one pass over `length` tokens uses: dynamic:s -> ntk:s_eff (module note), else as is."""
    if not scaling or scaling.get("rope_type") != "dynamic":
        return scaling
    s, original = float(scaling["factor"]), scaling["original_max_position_embeddings"]
    if length <= original:
        return None
    return {"rope_type": "ntk", "factor": s * length / original - (s - 1),
            "original_max_position_embeddings": original}


# ----------------------------------------------------------------------------- model runners


@torch.no_grad()
def window_hidden(model: Transformer, tokens: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """Final hidden states (T, C) of one window tokens (T,): one forward (chunk=None), or the KV cache
    filled `chunk` tokens at a time so activation memory is bounded by the chunk."""
    tokens = tokens.to(model.model.norm.weight.device)
    if chunk is None:
        return model.hidden(tokens[None])[0]
    model.setup_caches(1, tokens.shape[0])
    try:
        return torch.cat([model.hidden(tokens[None, s:s + chunk], start=s)[0] for s in range(0, tokens.shape[0], chunk)])
    finally:
        model.clear_caches()


@torch.no_grad()
def prefix_nll(model: Transformer, h: torch.Tensor, tokens: torch.Tensor, length: int, first: int = 0
               ) -> tuple[float, int]:
    """(sum of -log p(x_t | x_<t) over t in [first + 1, length), count) from a window's hidden states.

    Causal attention makes the first `length` rows of a longer window's h those of the window cut at
    `length` (same RoPE), so one pass serves every shorter window with the same start. The loss is the
    model's chunked cross-entropy: no (T, V) tensor.
    """
    tokens = tokens.to(h.device)
    labels = torch.cat((tokens[1:length], tokens.new_full((1,), -100)))  # (length,) target of each position
    labels[:first] = -100
    nll = chunked_cross_entropy(h[None, :length], model.lm_head, labels[None])
    return float(nll), int((labels != -100).sum())


def window_nll(model, tokens: torch.Tensor, first: int = 0, chunk: int | None = None) -> tuple[float, int]:
    """prefix_nll over the whole window tokens (T,)."""
    return prefix_nll(model, window_hidden(model, tokens, chunk), tokens, tokens.shape[0], first)


def stop_ids_for(tokenizer) -> list[int]:
    ids = [tokenizer.special_tokens.get(n) for n in END_OF_TURN] + [tokenizer.eos_id]
    return sorted({i for i in ids if i is not None})


def rope_override(theta: float, scaling: dict | None, spec: str | None, theta_override: float | None,
                  original_len: int) -> tuple[float, dict | None]:
    """rope.override for one --rope row; a bad spec or base is a UserError naming the flag."""
    try:
        return rope.override(theta, scaling, spec, theta_override, original_len)
    except ValueError as e:
        raise UserError(f"--rope {spec} / --rope-theta {theta_override}: {e}") from None


def set_rope(model, theta: float, scaling: dict | None):
    model.config.rope_theta, model.config.rope_scaling = theta, scaling


# ----------------------------------------------------------------------------- task runners
# Each runner scores one model at one (theta, scaling) and returns {"by_length": {L: {...}}, "items": [...]}.


def memo_key(model, *rest) -> str:
    """Key of a computation that depends only on the RoPE settings in effect and `rest`."""
    return json.dumps([model.config.rope_theta, model.config.rope_scaling, *rest], sort_keys=True)


def run_ppl(model, tokenizer, args, theta, scaling, stream, memo: dict) -> dict:
    """Longest lengths first: a window whose start and RoPE match the longer one just run is scored from
    that pass's hidden states (prefix_nll). memo keeps scores across rows (dynamic:s at L <= L0 is the
    plain-RoPE row's score); only one window's hidden states are kept."""
    out, items, hidden = {}, [], {}
    for L in sorted(args.lengths, reverse=True):
        set_rope(model, theta, fixed_rope(theta, scaling, L))
        nll = n = 0
        for start, first in tqdm(windows(stream, L, args.windows, args.stride), desc=f"ppl L={L}", leave=False):
            tokens = torch.tensor(stream[start:start + L], device=args.device)
            key = memo_key(model, start, L, first)
            if key not in memo:
                h = hidden.get(memo_key(model, start))
                if h is None or h.shape[0] < L:
                    hidden.clear()
                    h = hidden[memo_key(model, start)] = window_hidden(model, tokens, args.prefill_chunk)
                memo[key] = prefix_nll(model, h, tokens, L, first)
            s, c = memo[key]
            nll, n = nll + s, n + c
            items.append({"length": L, "start": start, "nll": s, "tokens": c})
        out[L] = {"ppl": math.exp(nll / n), "nll_per_token": nll / n, "tokens": n,
                  "rope_used": model.config.rope_scaling}
    return {"by_length": {L: out[L] for L in args.lengths}, "items": items}


def run_probe(model, tokenizer, args, theta, scaling, make_prompt, memo: dict) -> dict:
    """Shared loop of passkey/needle/kv/ruler: make_prompt(L, depth, trial, subtask) -> (ids, reference,
    max_new, at); `subtask` is the RULER task (None for the others)."""
    stop = stop_ids_for(tokenizer)
    items = []
    subtasks = args.ruler_tasks if args.task == "ruler" else [None]
    grid = [(s, L, depth, t) for s in subtasks for L in args.lengths for depth in args.depths
            for t in range(args.trials)]
    for sub in subtasks:  # a length too short for a task is a UserError before any generation, not midway
        for L in args.lengths:
            make_prompt(L, args.depths[0], 0, sub)
    for sub, L, depth, t in tqdm(grid, desc=args.task, leave=False):
        ids, ref, max_new, at = make_prompt(L, depth, t, sub)
        set_rope(model, theta, fixed_rope(theta, scaling, len(ids) + max_new))
        key = memo_key(model, L, depth, t) if sub is None else memo_key(model, sub, L, depth, t)
        if key not in memo:
            new = generate(model, ids, max_new, stop_ids=stop, prefill_chunk=args.prefill_chunk)
            memo[key] = tokenizer.decode(new[:-1] if new and new[-1] in stop else new)  # the stop token unsaid
        answer = memo[key]
        item = {"length": L, "depth": depth, "trial": t, "prompt_tokens": len(ids), "probe_index": at,
                "reference": ref, "answer": answer, "rope_used": model.config.rope_scaling}
        if args.task == "passkey":
            item["correct"] = passkey_correct(answer, ref)
        elif args.task == "ruler":
            item["task"], item["correct"] = sub, eval_ruler.score_ruler(sub, answer, ref)  # fraction of the references
        else:  # needle, kv: ours or a published protocol's scores
            item.update(eval_protocols.score(args.task, args.protocol, answer, ref))
        items.append(item)
    by_length = {}
    for L in args.lengths:
        sel = [i for i in items if i["length"] == L]
        by_length[L] = {"accuracy": sum(i["correct"] for i in sel) / len(sel)}
        for k in ("rouge_l_recall", "rouge_l_f"):
            if k in sel[0]:
                by_length[L][k] = sum(i[k] for i in sel) / len(sel)
    out = {"by_length": by_length, "items": items}
    if args.task == "ruler":  # accuracy above is the average over tasks; here each task alone, with its s.e.
        out["by_task"] = {s: {L: eval_ruler.summarize([i["correct"] for i in items if (i["task"], i["length"]) == (s, L)])
                              for L in args.lengths} for s in subtasks}
        out["average"] = {"name": eval_ruler.average_name(subtasks),
                          **{L: eval_ruler.average([out["by_task"][s][L] for s in subtasks]) for L in args.lengths}}
    return out


def prompt_maker(task: str, tokenizer, args, hay):
    """The task's make_prompt(L, depth, trial); keys and UUIDs depend only on (seed, L, depth, trial)."""
    template = None
    if task == "ruler":  # RULER's own templates and haystack sizes (eval_ruler.py); sample t of each task and length
        data, args.ruler_haystack = eval_ruler.setup(tokenizer, args.template, args.chat_template, args.haystack,
                                                args.qa_files, args.ruler_tasks, args.seed)
        return (lambda L, depth, t, sub: data.prompt(sub, L, t)), data.template or "base"
    if task == "kv" and args.protocol == "helmet":  # HELMET's recall runs without a chat template
        template = chat_template_for(tokenizer, args.chat_template) if args.chat_template not in (None, "none") else None
    elif task != "passkey" and not args.no_chat and args.chat_template != "none":
        try:
            template = chat_template_for(tokenizer, args.chat_template)
        except UserError:
            if args.chat_template is not None:
                raise  # a named template that does not exist
            template = None  # no chat special tokens (a base model): plain prompt

    def rng(L, depth, t):
        return random.Random(f"{args.seed}:{L}:{depth}:{t}")

    code_items = {}  # L -> (prompts, answers) of the code passkey

    def make(L, depth, t, sub=None):
        if task == "passkey" and args.format == "code":  # depth is None: drawn per prompt
            if L not in code_items:
                code_items[L] = code_passkey_items(hay, L, args.trials, args.seed)
            prompts, answers = code_items[L]
            return prompts[t], bytes(answers[t]).decode(), KEY_DIGITS, None
        if args.protocol != "ours":
            return eval_protocols.make_prompt(task, args.protocol, tokenizer, L, depth, rng(L, depth, t), template, hay)
        if task == "passkey":
            key = str(rng(L, depth, t).randint(10000, 99999))
            ids, at = passkey_prompt(tokenizer, L, depth, key)
            return ids, key, len(tokenizer.encode(" " + key)) + 2, at
        if task == "needle":
            ids, at = needle_prompt(tokenizer, hay[0], hay[1], L, depth, args.needle, args.question, template)
            return ids, args.needle, len(tokenizer.encode(args.needle)) + 16, at
        ids, _, value, at = kv_prompt(tokenizer, L, depth, rng(L, depth, t), template)
        return ids, value, len(tokenizer.encode(" " + value)) + 4, at

    return make, template


# ----------------------------------------------------------------------------- I/O


def git_revision() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, default=str))


# ----------------------------------------------------------------------------- entry points


def build_eval_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="Perplexity by length and long-context recall probes.")
    ap.add_argument("task", choices=TASKS)
    ap.add_argument("--model", action="append", default=None, help="preset, HF directory or .gguf (repeatable)")
    ap.add_argument("--adapter", action="append", default=None,
                    help="LoRA adapter directory per --model, in order, or 'none' (repeatable)")
    ap.add_argument("--tokenizer", default=None, help="default: the model's own; 'bytes' for presets")
    ap.add_argument("--rope", action="append", default=None,
                    help="RoPE setting per row (repeatable): default, linear:4, dynamic:2, yarn:2, ...; "
                         "default: the checkpoint's own")
    ap.add_argument("--rope-theta", type=float, default=None, help="override the RoPE base")
    ap.add_argument("--quant", choices=("nf4",), default=None, help="quantize the base weights to NF4")
    add_device_flags(ap)
    ap.add_argument("--out", default="runs/eval", help="output directory (JSON and PNG)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prefill-chunk", type=int, default=2048, help="tokens per prefill step; 0 = one pass")
    ap.add_argument("--lengths", default=None, help="default 2048,8192,16384, or the --protocol's own grid")
    ap.add_argument("--base-length", type=int, default=None,
                    help="the base's own context length: evaluated beside --lengths, and the length at which the "
                         "retained column compares each row with the first (default: the shortest length)")
    ap.add_argument("--depths", default=None, help=f"default {DEFAULT_DEPTHS}, or the --protocol's own grid")
    ap.add_argument("--protocol", default="ours", help="needle: ours, llama3-80k, kamradt; kv: ours, helmet "
                    "(eval_protocols.py: the published prompts, grids and scores)")
    ap.add_argument("--format", choices=FORMATS, default="text",
                    help="passkey: 'text' (filler sentences) or 'code' (the demo's probe: stdlib code, K$NNNN facts)")
    ap.add_argument("--trials", type=int, default=1,
                    help="passkey/kv: random keys per cell (the needle prompt is deterministic)")
    ap.add_argument("--windows", type=int, default=4, help="ppl: windows per length")
    ap.add_argument("--stride", type=int, default=None, help="ppl: sliding windows scoring their last STRIDE tokens")
    ap.add_argument("--docs", action="append", default=None, help="ppl: files/dirs (default: Python's stdlib .py)")
    ap.add_argument("--haystack", action="append", default=None,
                    help="needle: files/dirs; ruler: RULER's PaulGrahamEssays.json (default: Python's reference "
                         "manual text, pydoc_data.topics; not RULER's haystack)")
    ap.add_argument("--needle", default=NEEDLE)
    ap.add_argument("--question", default=QUESTION)
    ap.add_argument("--tasks", "--ruler-tasks", default=None,
                    help="ruler: RULER tasks, comma-separated (default: all 13, qa_1/qa_2 only with their files); "
                         "harness: lm-eval task names (e.g. mmlu)")
    ap.add_argument("--include-path", default=None, help="harness: a folder of lm-eval task YAML files")
    ap.add_argument("--limit", type=float, default=None, help="harness: examples per task (a fraction if < 1)")
    ap.add_argument("--num-fewshot", type=int, default=None, help="harness: in-context examples per prompt")
    ap.add_argument("--log-samples", action="store_true", help="harness: also write per-sample logs")
    ap.add_argument("--samples", default=str(eval_ruler.DEFAULT_SAMPLES),
                    help=f"ruler: samples per task and length, or 'quick' ({eval_ruler.QUICK_SAMPLES}, a smoke run)")
    ap.add_argument("--template", choices=eval_ruler.TEMPLATE_KINDS, default=None,
                    help="ruler: RULER's base template or the model's chat template (default: chat for a "
                         "tokenizer with a chat template)")
    ap.add_argument("--squad", default=None, help="ruler: SQuAD v2 dev JSON for qa_1 (RULER's squad.json)")
    ap.add_argument("--hotpotqa", default=None, help="ruler: HotpotQA dev JSON for qa_2 (RULER's hotpotqa.json)")
    ap.add_argument("--prepare-only", action="store_true",
                    help="ruler: write OUT/<L>/<task>/validation.jsonl in RULER's format; needs --tokenizer, no model")
    ap.add_argument("--no-chat", action="store_true", help="needle/kv: plain prompt even for chat models")
    ap.add_argument("--chat-template", default=None,
                    help="needle/kv/ruler: template name instead of the detected one (needle/kv: none = plain prompt)")
    return ap


def check_eval_args(args) -> None:
    args.device, dtype = device_and_dtype(args.device, args.dtype)
    args.dtype = str(dtype).removeprefix("torch.")
    grid = eval_protocols.default_grid(args.task, args.protocol)  # a UserError for a protocol the task lacks
    args.lengths = parse_ints(args.lengths or (",".join(map(str, grid[0])) if grid else "2048,8192,16384"),
                              "--lengths", minimum=2)
    if args.base_length is not None:
        if args.base_length < 2:
            raise UserError(f"--base-length must be an integer >= 2, got {args.base_length}")
        args.lengths = sorted(set(args.lengths) | {args.base_length})
    if args.format == "code":
        if args.task != "passkey":
            raise UserError(f"--format code applies to the passkey task only, not {args.task}")
        if args.depths is not None:
            raise UserError("--depths does not apply with --format code: each prompt draws its depth U(0, 0.9)")
        args.depths = [None]
    else:
        args.depths = parse_depths(args.depths or (",".join(map(str, grid[1])) if grid else DEFAULT_DEPTHS))
    check_ruler_args(args)
    args.adapter = args.adapter or ["none"] * len(args.model)
    if len(args.adapter) != len(args.model):
        raise UserError(f"--adapter given {len(args.adapter)} times for {len(args.model)} --model; give one per "
                         "model, 'none' for no adapter")
    args.adapter = [None if a == "none" else a for a in args.adapter]
    for a in args.adapter:
        if a is not None and not Path(a).is_dir():
            raise UserError(f"--adapter {a}: no such adapter directory")
    for name in ("trials", "windows"):
        check_range(f"--{name}", getattr(args, name), 1, MAX_ITEMS)
    check_range("--seed", args.seed, -2**63, 2**63 - 1)  # torch's seeds are int64
    if not (args.needle.strip() and args.question.strip()):
        raise UserError("--needle and --question must not be empty (the answer would be scored against nothing)")
    if args.stride is not None and not 0 < args.stride <= min(args.lengths):
        raise UserError(f"--stride {args.stride}: must be in [1, smallest length {min(args.lengths)}]")
    if args.prefill_chunk < 0:
        raise UserError(f"--prefill-chunk must be >= 0, got {args.prefill_chunk}")
    args.prefill_chunk = args.prefill_chunk or None
    args.rope = args.rope or [None]


def check_ruler_args(args) -> None:
    """RULER's protocol: samples instead of depths x trials; the qa tasks only with their files."""
    args.qa_files = {"qa_1": args.squad, "qa_2": args.hotpotqa}
    args.ruler_tasks = eval_ruler.parse_tasks(args.tasks if args.task == "ruler" else None, args.qa_files)
    if args.prepare_only and (args.task != "ruler" or args.tokenizer is None or args.model):
        raise UserError("--prepare-only: ruler only, with --tokenizer TOK and no --model (no model is loaded)")
    if args.model is None and not args.prepare_only:
        raise UserError("--model is required (or ruler --prepare-only --tokenizer TOK)")
    args.model = args.model or []
    if args.task != "ruler":
        return
    if args.depths != [float(x) for x in DEFAULT_DEPTHS.split(",")] or args.trials != 1:
        raise UserError("--depths/--trials do not apply to ruler: it draws depths by RULER's law; use --samples N")
    args.samples = eval_ruler.parse_samples(args.samples)
    args.depths, args.trials = [None], args.samples


def load(spec: str, adapter: str | None, args):
    """(model, tokenizer): the base (NF4 if asked, quantized tensor by tensor as it loads), then the LoRA
    adapter on top."""
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    tok = load_tokenizer(args.tokenizer or ("bytes" if spec in PRESETS else spec))
    # A preset is random weights for tests and dry runs: its vocabulary is sized to the tokenizer's.
    overrides = {"vocab_size": tok.vocab_size} if spec in PRESETS else {}
    vocab = read_config(spec).vocab_size if Path(spec).is_dir() else None
    if vocab is not None and tok.vocab_size > vocab:
        raise UserError(f"--tokenizer {tok.name}: {tok.vocab_size} tokens, more than the vocab_size {vocab} of "
                        f"--model {spec}; use the model's own tokenizer")
    model = load_model(spec, dtype=dtype, device=args.device, quant=args.quant, seed=args.seed,
                       **overrides).eval()  # streams NF4
    if adapter is not None:
        load_adapter(model, adapter)
    return model, tok


def run_harness(args) -> dict:
    """`eval.py harness`: the --model as `load` builds it (adapter, NF4) with its --rope, through lm-eval."""
    if len(args.model) != 1 or len(args.rope) != 1 or not args.tasks:
        raise UserError("harness: give one --model, at most one --rope, and --tasks T[,T...]")
    model, tok = load(args.model[0], args.adapter[0], args)
    mc = model.config
    set_rope(model, *rope_override(mc.rope_theta, mc.rope_scaling, args.rope[0], args.rope_theta, mc.max_seq_len))
    res = eval_harness.run_lm_eval(model, tok, args.model[0], args.tasks.split(","), args.out, args.include_path,
                                   args.limit, args.num_fewshot, args.log_samples, args.prefill_chunk, args.seed)
    print(eval_harness.table(res), f"\nwrote lm-eval's results under {args.out}", sep="")
    return res


def evaluate(args) -> list[dict]:
    """Every (model, adapter) x RoPE row; identical effective settings are computed once and reused."""
    out = check_output(args.out, "folder", "--out")  # created by the first write_json: a failed start leaves none
    for name in (f"{args.task}.json", f"{args.task}.png"):
        check_output(out / name, "file", "--out")
    meta = {"task": args.task, "git_revision": git_revision(), "device": str(args.device), "dtype": args.dtype,
            "quant": args.quant,
            "seed": args.seed, "prefill_chunk": args.prefill_chunk, "lengths": args.lengths, "depths": args.depths,
            "trials": args.trials, "windows": args.windows, "stride": args.stride, "format": args.format,
            "base_length": args.base_length, "protocol": args.protocol, "scoring": eval_protocols.SCORING[args.protocol],
            "samples": args.samples if args.task == "ruler" else None,
            "docs": args.docs or "python stdlib *.py (sorted)"}
    if args.prepare_only:  # RULER's jsonl files, no model
        data, _ = eval_ruler.setup(load_tokenizer(args.tokenizer), args.template, args.chat_template, args.haystack,
                              args.qa_files, args.ruler_tasks, args.seed)
        for path in eval_ruler.write_validation(data, args.lengths, args.ruler_tasks, args.samples, out):
            print(f"wrote {path}")
        return []
    hay = None
    rows, t0 = [], time.time()
    for spec, adapter in zip(args.model, args.adapter):
        model, tok = load(spec, adapter, args)
        mc = model.config  # the longest length must fit before any prompt or cache exists (generate.py)
        check_memory(mc, max(args.lengths), 0 if args.task == "ppl" else PROBE_NEW_TOKENS, args.prefill_chunk,
                     torch.finfo(getattr(torch, args.dtype)).bits // 8, args.device, "--lengths", of_prompt=True)
        base_theta, base_scaling = mc.rope_theta, mc.rope_scaling
        if args.task == "ppl":
            texts = document_texts(args.docs) if args.docs else stdlib_texts(stdlib_files())
            need = (args.windows - 1) * (args.stride or max(args.lengths)) + max(args.lengths)
            stream = token_stream(tok, texts, need)
        elif args.task == "passkey" and args.format == "code":
            if tok.kind != "bytes":
                raise UserError(f"--format code: {spec} has the {tok.kind} tokenizer; the code passkey is "
                                "byte-level (the demo's models)")
            hay = corpus_bytes(stdlib_split()[1])  # held-out stdlib code, as the demo evaluates on
        elif args.task == "needle" and args.protocol != "ours":
            hay, meta["haystack"] = eval_protocols.read_haystack(args.haystack)
        elif args.task == "needle":
            text = haystack_text(args.haystack)
            ids, spans = tok.encode_offsets(text)
            hay = (ids, sentence_starts(text, spans))
        if args.task != "ppl":
            make, template = prompt_maker(args.task, tok, args, hay)
        memo = {}  # (RoPE in effect, item) -> score: e.g. dynamic:s at L <= L0 is plain RoPE
        for spec_rope in args.rope:
            theta, scaling = rope_override(base_theta, base_scaling, spec_rope, args.rope_theta, mc.max_seq_len)
            if args.task == "ppl":
                res = run_ppl(model, tok, args, theta, scaling, stream, memo)
            else:
                res = run_probe(model, tok, args, theta, scaling, make, memo)
            set_rope(model, base_theta, base_scaling)
            rows.append({"model": spec, "adapter": adapter, "rope": spec_rope or "checkpoint",
                         "rope_theta": theta, "rope_scaling": scaling, "tokenizer": tok.name,
                         "chat_template": None if args.task == "ppl" else template, **res})
            print(f"{label(rows[-1])}: done at {time.time() - t0:.0f}s", file=sys.stderr)
            write_json(out / f"{args.task}.json", {**meta, "seconds": time.time() - t0, "rows": rows})  # so far
    if len(rows) > 1:  # short-context retention against the first row, at the base's own length
        at, metric = args.base_length or min(args.lengths), "ppl" if args.task == "ppl" else "accuracy"
        for r, x in zip(rows, retention(args.task, [r["by_length"][at][metric] for r in rows])):
            r["retained"] = {"length": at, "reference": label(rows[0]), metric: x}
        write_json(out / f"{args.task}.json", {**meta, "seconds": time.time() - t0, "rows": rows})
    note = plot(args.task, rows, args, out / f"{args.task}.png")
    print(markdown_table(args.task, rows, args.lengths, args.base_length))
    if args.task == "ruler":
        print(ruler_table(rows, args.lengths, args.base_length,
                          "" if args.ruler_haystack else " (essay tasks on the manual haystack: not RULER's)"))
    if args.protocol != "ours":
        print(f"protocol {args.protocol}: scored by {meta['scoring']}; haystack: {meta.get('haystack', 'none')}")
    print(note or f"wrote {out / (args.task + '.json')} and {out / (args.task + '.png')}")
    return rows


def main(argv=None) -> int:
    args = build_eval_parser().parse_args(argv)
    return run_cli(lambda: (check_eval_args(args), run_harness(args) if args.task == "harness" else evaluate(args)))


if __name__ == "__main__":
    sys.exit(main())
