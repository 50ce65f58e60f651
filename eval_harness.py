"""Our model as an lm-evaluation-harness language model (Gao et al., EleutherAI lm-evaluation-harness 0.4).

The long tail of the field's evaluations (MMLU for short-context retention, as Zhang et al. 2024 report for
Llama-3-8B-Instruct-80K; LongBench; the harness's own RULER) are lm-eval tasks. `HarnessLM` runs them on
the model exactly as `eval.py` loads it (NF4 base, LoRA adapter, RoPE override), with our chunked prefill
and KV cache (generate.py), instead of a merged Hugging Face copy:

    loglikelihood(context, continuation)   log p(cont | ctx) = sum_t log softmax(z_t)[cont_t] and whether
                                           every cont_t is the argmax; lm-eval's own TemplateLM splits the
                                           text into token ids (trailing spaces of the context move to the
                                           continuation; ctx + cont encoded whole, then cut at |enc(ctx)|),
                                           as its `--model hf` does, so the ids are the same;
    loglikelihood_rolling(text)            the sum over lm-eval's disjoint rolling windows of max_length;
    generate_until(context, gen_kwargs)    greedy from the context (left-cut to max_length - max_gen_toks),
                                           stopping at the end-of-text token or once a stop string appears,
                                           cut before the first stop string; special tokens are not decoded.

Only the continuation's hidden states meet the head, in float32: no (T, V) logits for long contexts.
`run` evaluates with `lm_eval.simple_evaluate` (tasks from lm-eval's registry and --include-path) and
writes lm-eval's own layout through its EvaluationTracker: DIR/<model>/results_<time>.json and, with
--log-samples, DIR/<model>/samples_<task>_<time>.jsonl. lm-eval is optional (`pip install lm-eval`),
imported only here and only when used.

Notation: T tokens of one request, C model dim, V vocab.
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path

import torch

from outputs import atomic_path
from errors import UserError
from generate import generate

# ----------------------------------------------------------------------------- constants

MAX_GEN_TOKS = 256  # lm-eval's default for generate_until (HFLM.max_gen_toks)
LM_EVAL_MISSING = "the harness needs lm-evaluation-harness: pip install lm-eval"


def lm_eval_api():
    """(lm_eval, its api.model, its utils), or a UserError naming the pip package."""
    try:
        return (importlib.import_module("lm_eval"), importlib.import_module("lm_eval.api.model"),
                importlib.import_module("lm_eval.utils"))
    except ImportError:
        raise UserError(LM_EVAL_MISSING) from None


# ----------------------------------------------------------------------------- pure functions


def cut_at_stops(text: str, stops: list[str]) -> str:
    """The text before the first occurrence of each stop string in turn (lm-eval's postprocessing)."""
    for s in stops:
        if s:
            text = text.split(s)[0]
    return text


@torch.no_grad()
def continuation_logprob(model, context: list[int], continuation: list[int], max_length: int,
                         chunk: int | None) -> tuple[float, bool]:
    """(sum_t log p(cont_t | ...), all greedy) for ids context + continuation cut to the last max_length + 1,
    the last id dropped (lm-eval's input), scored on the continuation's positions only."""
    device = model.model.norm.weight.device
    inp = (context + continuation)[-(max_length + 1):][:-1]
    n = len(continuation)
    tokens = torch.tensor(inp, device=device)
    model.setup_caches(1, len(inp))
    try:  # the KV cache filled `chunk` tokens at a time; only the last n positions' states are kept
        h = [model.hidden(tokens[None, s:s + (chunk or len(inp))], start=s)[0]
             for s in range(0, len(inp), chunk or len(inp))]
    finally:
        model.clear_caches()
    h = torch.cat(h)[-n:]  # (n, C)
    logp = torch.log_softmax(model.lm_head(h).float(), dim=-1)  # (n, V)
    target = torch.tensor(continuation, device=device)
    return float(logp.gather(1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())


# ----------------------------------------------------------------------------- the LM


def harness_lm(model, tokenizer, max_length: int, prefill_chunk: int | None = None):
    """An lm_eval TemplateLM (a subclass of lm_eval.api.model.LM) over our model and tokenizer."""
    _, api, utils = lm_eval_api()
    specials = set(tokenizer.special_tokens.values())
    eot = tokenizer.eos_id if tokenizer.eos_id is not None else tokenizer.bos_id

    class HarnessLM(api.TemplateLM):
        @property
        def eot_token_id(self):
            return eot

        @property
        def prefix_token_id(self):  # as HFLM: BOS when the tokenizer has one, else end-of-text
            return tokenizer.bos_id if tokenizer.bos_id is not None else eot

        @property
        def max_length(self):
            return max_length

        def tok_encode(self, string, add_special_tokens=None, left_truncate_len=None, **kwargs):
            """The tokenizer's own default for BOS (as HF's add_special_tokens), none if the text has it."""
            bos_text = tokenizer.decode([tokenizer.bos_id]) if tokenizer.bos_id is not None else None
            add = tokenizer.add_bos if add_special_tokens is None else add_special_tokens
            add = add and tokenizer.bos_id is not None and not (add_special_tokens is None and bos_text
                                                                 and string.startswith(bos_text))
            ids = tokenizer.encode(string, bos=bool(add))
            return ids[-left_truncate_len:] if left_truncate_len else ids

        def tok_decode(self, ids):
            return tokenizer.decode([i for i in ids if i not in specials])

        def _loglikelihood_tokens(self, requests, disable_tqdm=False, **kwargs):
            out = []
            for key, ctx, cont in requests:
                out.append(continuation_logprob(model, ctx, cont, max_length, prefill_chunk))
                self.cache_hook.add_partial("loglikelihood", key, out[-1])
            return out

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            out = []
            for (text,) in (r.args for r in requests):
                windows = map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id, max_seq_len=max_length,
                    context_len=1))
                out.append(sum(continuation_logprob(model, c, t, max_length, prefill_chunk)[0] for c, t in windows))
            return out

        def generate_until(self, requests, disable_tqdm=False):
            out = []
            eos_text = tokenizer.decode([eot])
            for context, gen_kwargs in (r.args for r in requests):
                kw = dict(gen_kwargs)
                if kw.get("do_sample") or kw.get("temperature", 0) > 0:
                    raise UserError("harness: generation is greedy here; the task asks for sampling "
                                    "(do_sample/temperature in its generation_kwargs)")
                until = kw.get("until") or []
                stops = ([until] if isinstance(until, str) else list(until)) + [eos_text]
                max_new = int(kw.get("max_gen_toks", kw.get("max_new_tokens", MAX_GEN_TOKS)))
                ids = self.tok_encode(context, left_truncate_len=max_length - max_new)
                new = generate(model, ids, max_new, stop_ids=[eot], prefill_chunk=prefill_chunk,
                               until=lambda got: any(s in self.tok_decode(got) for s in stops))
                out.append(cut_at_stops(self.tok_decode(new), stops))
            return out

    return HarnessLM()


# ----------------------------------------------------------------------------- entry point


def max_length_of(config) -> int:
    """The context the model is run at: its own, or original x factor of a RoPE scaling (--rope yarn:4 ...)."""
    s = config.rope_scaling or {}
    if s.get("rope_type") == "dynamic":
        raise UserError("harness: --rope dynamic:s rescales per request length; use a fixed one (ntk:s, yarn:s)")
    scaled = int(s["factor"] * s["original_max_position_embeddings"]) if "factor" in s and \
        "original_max_position_embeddings" in s else 0
    return max(config.max_seq_len, scaled)


def table(results: dict) -> str:
    """lm-eval's own markdown table of the results."""
    return lm_eval_api()[2].make_table(results)


def run_lm_eval(model, tokenizer, model_name: str, tasks: list[str], out: str, include_path: str | None = None,
        limit: float | None = None, num_fewshot: int | None = None, log_samples: bool = False,
        prefill_chunk: int | None = None, seed: int = 0) -> dict:
    """lm_eval.simple_evaluate over `tasks` with our model; results (and samples) written under `out` in
    lm-eval's layout, all at once (a temporary folder renamed into place). Returns lm-eval's results."""
    lm_eval, _, _ = lm_eval_api()
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.tasks import TaskManager

    if limit is not None and limit <= 0 or num_fewshot is not None and num_fewshot < 0:
        raise UserError(f"--limit {limit} / --num-fewshot {num_fewshot}: need a limit > 0 and 0 or more examples")
    limit = int(limit) if limit is not None and limit >= 1 else limit
    max_length = max_length_of(model.config)
    if include_path is not None and not Path(include_path).is_dir():
        raise UserError(f"--include-path {include_path}: no such folder of task YAML files")
    manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if not manager.match_tasks([t])]
    if unknown:
        raise UserError(f"--tasks: unknown lm-eval task(s) {','.join(unknown)}; see `lm_eval ls tasks`, or pass "
                        "--include-path with their YAML")
    lm = harness_lm(model, tokenizer, max_length, prefill_chunk)
    with atomic_path(out, is_dir=True, replace=False) as tmp:
        tracker = EvaluationTracker(output_path=str(tmp))
        results = lm_eval.simple_evaluate(
            model=lm, model_args={"pretrained": model_name}, tasks=tasks, num_fewshot=num_fewshot, limit=limit,
            log_samples=log_samples, task_manager=manager, evaluation_tracker=tracker, random_seed=seed,
            numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
        samples = results.pop("samples", None) if log_samples else None
        tracker.save_results_aggregated(results=results, samples=samples)
        for task in results["configs"] if log_samples else []:
            tracker.save_results_samples(task_name=task, samples=samples[task])
    return json.loads(json.dumps(results, default=str))
