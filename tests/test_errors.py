"""Every bad input is one clear line: a table of user mistakes across the entry points (train.py, eval.py,
data.py, data_synth.py, checkpoint.py convert, generate.py, lora_peft.py, gguf_export.py, demo.py,
demo_compare.py), each asserting a non-zero exit, no traceback, the offending flag/file/field named in the
message, and no file left behind or deleted (output paths that exist and are not what the command writes are refused).

Every case calls the entry point's `main(argv)` in-process (the fast path); the working directory is the
case's own temporary folder, so a stray relative write would show up in the before/after listing too.
"""
import fcntl
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import checkpoint
import demo_compare
import data
import demo
import eval as evaluate_cli
import generate
import gguf_export
import train_guards
import lora
import lora_peft
import data_synth
import tokenizer
import train
from model import ModelConfig, Transformer

TINY = ["--model", "tiny", "--tokenizer", "bytes", "--ctx", "32"]
RULER = "ruler --model tiny --samples 1 --lengths 2048".split()


def tiny_config(**kw) -> dict:
    cfg = ModelConfig(vocab_size=300, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=48, max_seq_len=64,
                      **kw).to_hf()
    return cfg


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Read-only inputs shared by the cases: a tiny HF model, a small-vocabulary model, an adapter with a
    NaN, and a finished training run with two checkpoints."""
    a = tmp_path_factory.mktemp("assets")
    torch.manual_seed(0)
    cfg = ModelConfig(**tiny_config_args())
    checkpoint.save_model(Transformer(cfg), a / "hf")
    small = ModelConfig(**{**tiny_config_args(), "vocab_size": 64})
    checkpoint.save_model(Transformer(small), a / "hf_small_vocab")
    (a / "text.txt").write_text("The quick brown fox jumps over the lazy dog. " * 40)
    run = a / "run"
    train.main([*TINY, "--data", str(a / "text.txt"), "--steps", "2", "--save-every", "1", "--keep", "2",
                "--out", str(run), "--lora-r", "2"])
    net = Transformer(cfg)
    lora.apply_lora(net, r=2, alpha=4.0, targets=("q_proj",), seed=0)
    lora_peft.save_adapter(net, a / "adapter", base_model_path=str(a / "hf"))
    lora_peft.save_adapter(net, a / "adapter_nan", base_model_path=str(a / "hf"))
    f = a / "adapter_nan" / "adapter_model.safetensors"
    t = load_file(str(f))
    k = next(iter(t))
    t[k] = t[k].clone()
    t[k].view(-1)[0] = float("nan")
    save_file(t, str(f))
    return a


def tiny_config_args() -> dict:
    return dict(vocab_size=300, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=48, max_seq_len=64)


def prepare(ws: Path, a: Path) -> None:
    """The bad (and a few good) files a case may name, under the case's folder `ws`."""
    shutil.copy(a / "text.txt", ws / "a.txt")
    (ws / "empty.txt").write_text("")
    (ws / "afile").write_text("not a folder\n")
    (ws / "bad.jsonl").write_text('{"text": "fine"}\n{not json\n')
    (ws / "shape.jsonl").write_text('{"foo": 1}\n')
    (ws / "tokenizer.model").write_bytes(b"\x00garbage, not a sentencepiece model\xff" * 8)
    (ws / "tokenizer.json").write_text("{ not json")
    (ws / "weights.bin").write_bytes(b"\x80\x02pickle")
    (ws / "bad.gguf").write_bytes(b"GGUF\x03\x00\x00\x00broken")
    for name, change in [("cfg_only", {}), ("cfg_type", {"vocab_size": "many"}), ("cfg_sign", {"hidden_size": -32}),
                         ("cfg_float", {"num_hidden_layers": 1.5}), ("cfg_theta", {"rope_theta": "inf"}),
                         ("cfg_arch", {"model_type": "gpt2"})]:
        (ws / name).mkdir()
        (ws / name / "config.json").write_text(json.dumps({**tiny_config(), **change}))
    (ws / "cfg_json").mkdir()
    (ws / "cfg_json" / "config.json").write_text("{ nope")
    (ws / "nonempty").mkdir()
    (ws / "nonempty" / "keep.txt").write_text("x")


def corrupt_run(ws: Path, a: Path, what: str) -> None:
    shutil.copytree(a / "run", ws / "out")
    newest = sorted((ws / "out").glob("ckpt-*"))[-1]
    if what == "state":
        (newest / "trainer_state.json").write_text('{"step": 2, "sched')
    elif what == "optimizer":
        f = newest / "optimizer.safetensors"
        f.write_bytes(f.read_bytes()[:40])
    elif what == "rng":
        (newest / "rng.safetensors").write_bytes(b"\x00" * 8)
    elif what == "adapter":
        shutil.rmtree(newest / "adapter")


T, E, D, S, C, G, L = "train", "eval", "data", "synth", "convert", "generate", "lora"
GG, DM, CM = "gguf", "demo", "compare"
MAINS = {T: train.main, E: evaluate_cli.main, D: data.main, S: data_synth.main, C: checkpoint.main, G: generate.main,
         L: lora_peft.main, GG: gguf_export.main, DM: demo.main, CM: demo_compare.main}
DATA = ["--data", "{ws}/a.txt", "--out", "{ws}/out", "--steps", "2"]
RESUME = [*TINY, "--data", "{a}/text.txt", "--out", "{ws}/out", "--steps", "4", "--save-every", "1", "--keep", "2"]

# (id, entry point, argv, text the one line must contain, setup)
CASES = [
    # train.py: numbers that must be finite and positive, checked before anything loads
    ("lr-negative", T, [*TINY, *DATA, "--lr", "-1"], "--lr", None),
    ("lr-zero", T, [*TINY, *DATA, "--lr", "0"], "--lr", None),
    ("lr-nan", T, [*TINY, *DATA, "--lr", "nan"], "--lr", None),
    ("lr-inf", T, [*TINY, *DATA, "--lr", "inf"], "--lr", None),
    ("rope-theta-inf", T, [*TINY, *DATA, "--rope-theta", "inf"], "--rope-theta", None),
    ("rope-theta-negative", T, [*TINY, *DATA, "--rope-theta", "-5"], "--rope-theta", None),
    ("rope-factor-inf", T, [*TINY, *DATA, "--rope", "linear:inf"], "--rope", None),
    ("rope-factor-negative", T, [*TINY, *DATA, "--rope", "linear:-2"], "--rope", None),
    ("rope-factor-nan", T, [*TINY, *DATA, "--rope", "yarn:nan"], "--rope", None),
    ("rope-unknown", T, [*TINY, *DATA, "--rope", "wobbly:3"], "wobbly", None),
    ("clip-negative", T, [*TINY, *DATA, "--clip", "-1"], "--clip", None),
    ("clip-nan", T, [*TINY, *DATA, "--clip", "nan"], "--clip", None),
    ("warmup-negative", T, [*TINY, *DATA, "--warmup", "-1"], "--warmup", None),
    ("weight-decay-negative", T, [*TINY, *DATA, "--weight-decay", "-0.1"], "--weight-decay", None),
    ("weight-decay-nan", T, [*TINY, *DATA, "--weight-decay", "nan"], "--weight-decay", None),
    ("lora-alpha-nan", T, [*TINY, *DATA, "--lora-alpha", "nan"], "--lora-alpha", None),
    ("lora-alpha-zero", T, [*TINY, *DATA, "--lora-alpha", "0"], "--lora-alpha", None),
    ("lora-dropout-one", T, [*TINY, *DATA, "--lora-dropout", "1"], "--lora-dropout", None),
    ("lora-r-zero", T, [*TINY, *DATA, "--lora-r", "0"], "--lora-r", None),
    ("group-ratio-nan", T, [*TINY, *DATA, "--attn", "s2", "--group-ratio", "nan"], "--group-ratio", None),
    ("ctx-one", T, ["--model", "tiny", "--tokenizer", "bytes", "--ctx", "1", *DATA], "--ctx", None),
    ("steps-zero", T, [*TINY, "--data", "{ws}/a.txt", "--out", "{ws}/out", "--steps", "0"], "--steps", None),
    ("epochs-negative", T, [*TINY, "--data", "{ws}/a.txt", "--out", "{ws}/out", "--epochs", "-1"], "--epochs", None),
    ("epochs-nan", T, [*TINY, "--data", "{ws}/a.txt", "--out", "{ws}/out", "--epochs", "nan"], "--epochs", None),
    ("steps-and-epochs", T, [*TINY, *DATA, "--epochs", "1"], "--epochs", None),
    ("keep-zero", T, [*TINY, *DATA, "--keep", "0"], "--keep", None),
    ("save-every-negative", T, [*TINY, *DATA, "--save-every", "-1"], "--save-every", None),
    ("lora-targets-unknown", T, [*TINY, *DATA, "--lora-targets", "q_proj,wobble"], "wobble", None),
    ("train-unknown", T, [*TINY, *DATA, "--train", "everything"], "--train", None),
    ("chat-template-unknown", T, [*TINY, *DATA, "--chat-template", "nope"], "nope", None),
    ("suggest-base-no-model", T, ["--suggest-base", "8192"], "--suggest-base", None),
    ("suggest-base-zero", T, ["--model", "tiny", "--suggest-base", "0"], "--suggest-base", None),
    # train.py: data
    ("data-weight-word", T, [*TINY, "--data", "{ws}/a.txt:abc", "--out", "{ws}/out"], "abc", None),
    ("data-weight-negative", T, [*TINY, "--data", "{ws}/a.txt:-1", "--out", "{ws}/out"], "a.txt:-1", None),
    ("data-weight-zero", T, [*TINY, "--data", "{ws}/a.txt:0", "--out", "{ws}/out"], "a.txt:0", None),
    ("data-weight-inf", T, [*TINY, "--data", "{ws}/a.txt:inf", "--out", "{ws}/out"], "a.txt:inf", None),
    ("data-missing", T, [*TINY, "--data", "{ws}/missing.jsonl", "--out", "{ws}/out"], "missing.jsonl", None),
    ("data-empty", T, [*TINY, "--data", "{ws}/empty.txt", "--out", "{ws}/out", "--steps", "1"], "empty.txt", None),
    ("data-bad-json", T, [*TINY, "--data", "{ws}/bad.jsonl", "--out", "{ws}/out", "--steps", "1"], "bad.jsonl", None),
    ("data-no-model", T, ["--ctx", "32", "--data", "{ws}/a.txt"], "--model", None),
    # train.py: models, tokenizers and --out
    ("model-missing", T, ["--model", "{ws}/nowhere", "--ctx", "32", *DATA], "nowhere", None),
    ("model-config-only", T, ["--model", "{ws}/cfg_only", "--tokenizer", "bytes", "--ctx", "32", *DATA],
     "weights", None),
    ("model-config-type", T, ["--model", "{ws}/cfg_type", "--tokenizer", "bytes", "--ctx", "32", *DATA],
     "vocab_size", None),
    ("model-config-sign", T, ["--model", "{ws}/cfg_sign", "--tokenizer", "bytes", "--ctx", "32", *DATA],
     "cfg_sign/config.json", None),
    ("model-config-float", T, ["--model", "{ws}/cfg_float", "--tokenizer", "bytes", "--ctx", "32", *DATA],
     "num_hidden_layers", None),
    ("model-config-theta", T, ["--model", "{ws}/cfg_theta", "--tokenizer", "bytes", "--ctx", "32", *DATA],
     "cfg_theta/config.json", None),
    ("model-config-json", T, ["--model", "{ws}/cfg_json", "--tokenizer", "bytes", "--ctx", "32", *DATA],
     "cfg_json/config.json", None),
    ("model-config-arch", T, ["--model", "{ws}/cfg_arch", "--tokenizer", "bytes", "--ctx", "32", *DATA],
     "gpt2", None),
    ("model-pickle", T, ["--model", "{ws}/weights.bin", "--tokenizer", "bytes", "--ctx", "32", *DATA],
     "weights.bin", None),
    ("tokenizer-larger-than-vocab", T, ["--model", "{a}/hf_small_vocab", "--tokenizer", "bytes", "--ctx", "32",
                                        *DATA], "vocab", None),
    ("tokenizer-model-corrupt", T, ["--model", "tiny", "--tokenizer", "{ws}/tokenizer.model", "--ctx", "32", *DATA],
     "tokenizer.model", None),
    ("tokenizer-json-corrupt", T, ["--model", "tiny", "--tokenizer", "{ws}/tokenizer.json", "--ctx", "32", *DATA],
     "tokenizer.json", None),
    ("tokenizer-missing", T, ["--model", "tiny", "--tokenizer", "{ws}/nope.json", "--ctx", "32", *DATA],
     "nope.json", None),
    ("out-is-file", T, [*TINY, "--data", "{ws}/a.txt", "--out", "{ws}/afile", "--steps", "1"], "afile", None),
    ("out-under-file", T, [*TINY, "--data", "{ws}/a.txt", "--out", "{ws}/afile/run", "--steps", "1"], "afile", None),
    # train.py: resume
    ("resume-other-run", T, [*RESUME, "--lora-r", "4", "--resume"], "lora_r", "run"),
    ("no-resume-over-run", T, [*TINY, *DATA, "--lora-r", "2"], "--resume", "run"),
    ("resume-corrupt-state", T, [*RESUME, "--lora-r", "2", "--resume"], "trainer_state.json", "state"),
    ("resume-truncated-optimizer", T, [*RESUME, "--lora-r", "2", "--resume"], "optimizer.safetensors",
     "optimizer"),
    ("resume-corrupt-rng", T, [*RESUME, "--lora-r", "2", "--resume"], "rng.safetensors", "rng"),
    ("resume-from-missing", T, [*RESUME, "--lora-r", "2", "--resume-from", "{ws}/out/ckpt-9"], "ckpt-9",
     "run"),
    # eval.py
    ("eval-passkey-short", E, ["passkey", "--model", "tiny", "--lengths", "8", "--out", "{ws}/out"], "--lengths", None),
    ("eval-kv-short", E, ["kv", "--model", "tiny", "--lengths", "16", "--out", "{ws}/out"], "--lengths", None),
    ("eval-needle-short", E, ["needle", "--model", "tiny", "--lengths", "8", "--out", "{ws}/out"], "--lengths", None),
    ("eval-lengths-word", E, ["ppl", "--model", "tiny", "--lengths", "abc", "--out", "{ws}/out"], "--lengths", None),
    ("eval-lengths-negative", E, ["ppl", "--model", "tiny", "--lengths=-5", "--out", "{ws}/out"], "--lengths", None),
    ("eval-depths-out-of-range", E, ["needle", "--model", "tiny", "--depths", "2", "--out", "{ws}/out"], "--depths",
     None),
    ("eval-trials-zero", E, ["passkey", "--model", "tiny", "--trials", "0", "--out", "{ws}/out"], "--trials", None),
    ("eval-windows-zero", E, ["ppl", "--model", "tiny", "--windows", "0", "--out", "{ws}/out"], "--windows", None),
    ("eval-stride-zero", E, ["ppl", "--model", "tiny", "--stride", "0", "--out", "{ws}/out"], "--stride", None),
    ("eval-prefill-negative", E, ["ppl", "--model", "tiny", "--prefill-chunk", "-1", "--out", "{ws}/out"],
     "--prefill-chunk", None),
    ("eval-rope-theta-inf", E, ["ppl", "--model", "tiny", "--rope-theta", "inf", "--out", "{ws}/out"],
     "--rope-theta", None),
    ("eval-rope-bad", E, ["ppl", "--model", "tiny", "--rope", "linear:-1", "--out", "{ws}/out"], "--rope", None),
    ("eval-ruler-tasks", E, ["ruler", "--model", "tiny", "--tasks", "nope", "--out", "{ws}/out"], "--tasks", None),
    ("eval-ruler-too-short", E, [*RULER, "--lengths", "300", "--tasks", "vt", "--out", "{ws}/out"], "--lengths 300",
     None),
    ("eval-ruler-samples", E, ["ruler", "--model", "tiny", "--samples", "0", "--out", "{ws}/out"], "--samples", None),
    ("eval-ruler-depths", E, [*RULER, "--depths", "0.5", "--out", "{ws}/out"], "--depths", None),
    ("eval-ruler-template", E, [*RULER, "--template", "fancy", "--out", "{ws}/out"], "--template", None),
    ("eval-ruler-qa-without-file", E, [*RULER, "--tasks", "qa_1", "--out", "{ws}/out"], "--squad", None),
    ("eval-ruler-squad-missing", E, [*RULER, "--tasks", "qa_1", "--squad", "{ws}/nosquad.json", "--out", "{ws}/out"],
     "nosquad.json", None),
    ("eval-ruler-squad-not-json", E, [*RULER, "--tasks", "qa_1", "--squad", "{ws}/tokenizer.json", "--out",
                                      "{ws}/out"], "--squad", None),
    ("eval-ruler-hotpotqa-shape", E, [*RULER, "--tasks", "qa_2", "--hotpotqa", "{ws}/cfg_only/config.json", "--out",
                                      "{ws}/out"], "--hotpotqa", None),
    ("eval-ruler-haystack-shape", E, [*RULER, "--tasks", "niah_single_2", "--haystack", "{ws}/cfg_only/config.json",
                                      "--out", "{ws}/out"], "--haystack", None),
    ("eval-ruler-prepare-no-tokenizer", E, ["ruler", "--prepare-only", "--out", "{ws}/out"], "--prepare-only", None),
    ("eval-adapter-missing", E, ["ppl", "--model", "tiny", "--adapter", "{ws}/noadapter", "--out", "{ws}/out"],
     "noadapter", None),
    ("eval-model-missing", E, ["ppl", "--model", "{ws}/nowhere", "--lengths", "16", "--out", "{ws}/out"], "nowhere",
     None),
    ("eval-docs-missing", E, ["ppl", "--model", "tiny", "--lengths", "16", "--docs", "{ws}/nodocs", "--out",
                              "{ws}/out"], "nodocs", None),
    ("eval-out-is-file", E, ["ppl", "--model", "tiny", "--lengths", "16", "--docs", "{ws}/a.txt", "--windows", "1",
                             "--out", "{ws}/afile"], "afile", None),
    ("eval-tokenizer-larger", E, ["ppl", "--model", "{a}/hf_small_vocab", "--tokenizer", "bytes", "--lengths", "16",
                                  "--docs", "{ws}/a.txt", "--out", "{ws}/out"], "vocab", None),
    # data.py stats
    ("data-stats-missing", D, ["stats", "{ws}/missing.jsonl", "--tokenizer", "bytes"], "missing.jsonl", None),
    ("data-stats-bad-json", D, ["stats", "{ws}/bad.jsonl", "--tokenizer", "bytes"], "bad.jsonl", None),
    ("data-stats-shape", D, ["stats", "{ws}/shape.jsonl", "--tokenizer", "bytes"], "shape.jsonl", None),
    ("data-stats-tokenizer", D, ["stats", "{ws}/a.txt", "--tokenizer", "{ws}/tokenizer.model"], "tokenizer.model",
     None),
    ("data-stats-template", D, ["stats", "{ws}/shape.jsonl", "--tokenizer", "bytes", "--template", "nope"], "nope",
     None),
    # data_synth.py
    ("synth-docs-missing", S, ["--docs", "{ws}/nodocs", "--tokenizer", "bytes", "--ctx", "2048", "--out",
                               "{ws}/out/s.jsonl"], "nodocs", None),
    ("synth-ctx-zero", S, ["--docs", "{ws}/a.txt", "--tokenizer", "bytes", "--ctx", "0", "--out",
                           "{ws}/out/s.jsonl"], "--ctx", None),
    ("synth-n-zero", S, ["--docs", "{ws}/a.txt", "--tokenizer", "bytes", "--ctx", "2048", "--n", "0", "--out",
                         "{ws}/out/s.jsonl"], "--n", None),
    ("synth-kinds", S, ["--docs", "{ws}/a.txt", "--tokenizer", "bytes", "--ctx", "2048", "--kinds", "poems", "--out",
                        "{ws}/out/s.jsonl"], "poems", None),
    ("synth-tokenizer", S, ["--docs", "{ws}/a.txt", "--tokenizer", "{ws}/tokenizer.model", "--ctx", "2048", "--out",
                            "{ws}/out/s.jsonl"], "tokenizer.model", None),
    ("synth-template", S, ["--docs", "{ws}/a.txt", "--tokenizer", "bytes", "--ctx", "2048", "--template", "nope",
                           "--out", "{ws}/out/s.jsonl"], "nope", None),
    ("synth-out-under-file", S, ["--docs", "{ws}/a.txt", "--tokenizer", "bytes", "--ctx", "2048", "--template",
                                 "chatml", "--out", "{ws}/afile/s.jsonl"], "afile", None),
    ("synth-generator-missing", S, ["--docs", "{ws}/a.txt", "--tokenizer", "bytes", "--ctx", "2048", "--generator",
                                    "{ws}/nowhere", "--template", "chatml", "--out", "{ws}/out/s.jsonl"], "nowhere",
     None),
    # checkpoint.py convert
    ("convert-src-missing", C, ["convert", "{ws}/nowhere", "{ws}/out"], "nowhere", None),
    ("convert-pickle", C, ["convert", "{ws}/weights.bin", "{ws}/out"], "weights.bin", None),
    ("convert-config-only", C, ["convert", "{ws}/cfg_only", "{ws}/out"], "weights", None),
    ("convert-bad-gguf", C, ["convert", "{ws}/bad.gguf", "{ws}/out"], "bad.gguf", None),
    ("convert-out-nonempty", C, ["convert", "{a}/hf", "{ws}/nonempty"], "nonempty", None),
    ("convert-out-under-file", C, ["convert", "{a}/hf", "{ws}/afile/out"], "afile", None),
    # generate.py
    ("generate-negative-tokens", G, ["--model", "tiny", "--prompt", "hi", "--max-new-tokens", "-3"],
     "--max-new-tokens", None),
    ("generate-model-missing", G, ["--model", "{ws}/nowhere", "--prompt", "hi"], "nowhere", None),
    ("generate-config-only", G, ["--model", "{ws}/cfg_only", "--prompt", "hi"], "weights", None),
    ("generate-config-type", G, ["--model", "{ws}/cfg_type", "--prompt", "hi"], "vocab_size", None),
    # lora_peft.py merge
    ("lora-nan-adapter", L, ["{a}/hf", "{a}/adapter_nan", "{ws}/out"], "adapter_model.safetensors", None),
    ("lora-adapter-missing", L, ["{a}/hf", "{ws}/noadapter", "{ws}/out"], "noadapter", None),
    ("lora-wrong-base", L, ["tiny", "{a}/adapter", "{ws}/out"], "adapter", None),
    ("lora-out-nonempty", L, ["{a}/hf", "{a}/adapter", "{ws}/nonempty"], "nonempty", None),
    ("lora-out-under-file", L, ["{a}/hf", "{a}/adapter", "{ws}/afile/out"], "afile", None),
    ("lora-base-config-only", L, ["{ws}/cfg_only", "{a}/adapter", "{ws}/out"], "weights", None),
    # ------------------------------------------------------------------------- output paths and run control
    # (refused in one line before any work, nothing deleted: the listing check below covers every case)
    ("out-gguf-existing-folder", GG, ["{a}/hf", "{ws}/nonempty"], "nonempty", None),
    ("out-gguf-is-its-source", GG, ["{ws}/bad.gguf", "{ws}/bad.gguf"], "input", None),
    ("out-gguf-under-file", GG, ["{a}/hf", "{ws}/afile/m.gguf"], "afile", None),
    ("out-synth-existing-folder", S, ["--docs", "{ws}/a.txt", "--tokenizer", "bytes", "--ctx", "2048", "--template",
                                      "chatml", "--out", "{ws}/nonempty"], "nonempty", None),
    ("out-synth-is-a-document", S, ["--docs", "{ws}/a.txt", "--tokenizer", "bytes", "--ctx", "2048", "--template",
                                    "chatml", "--out", "{ws}/a.txt"], "input", None),
    ("out-synth-partial-is-folder", S, ["--docs", "{ws}/a.txt", "--tokenizer", "bytes", "--ctx", "2048", "--template",
                                        "chatml", "--out", "{ws}/s.jsonl"], "s.jsonl.partial", "partial-folder"),
    ("out-eval-json-is-folder", E, ["ppl", "--model", "tiny", "--lengths", "16", "--docs", "{ws}/a.txt", "--windows",
                                    "1", "--out", "{ws}/res"], "ppl.json", "eval-json-folder"),
    ("out-eval-png-is-folder", E, ["ppl", "--model", "tiny", "--lengths", "16", "--docs", "{ws}/a.txt", "--windows",
                                   "1", "--out", "{ws}/res"], "ppl.png", "eval-png-folder"),
    ("out-convert-is-file", C, ["convert", "{a}/hf", "{ws}/afile"], "afile", None),
    ("out-lora-is-its-base", L, ["{ws}/hfb", "{a}/adapter", "{ws}/hfb"], "hfb", "hf-bytes"),
    ("out-train-foreign-folder", T, [*TINY, "--data", "{ws}/a.txt", "--out", "{ws}/nonempty", "--steps", "1"],
     "nonempty", None),
    ("out-train-is-its-model", T, ["--model", "{ws}/hfb", "--data", "{ws}/a.txt", "--ctx", "32", "--steps", "1",
                                   "--out", "{ws}/hfb"], "hfb", "hf-bytes"),
    ("out-train-merged-is-file", T, [*RESUME, "--lora-r", "2", "--resume", "--merge"], "merged", "run-merged-file"),
    ("out-train-locked", T, [*RESUME, "--lora-r", "2", "--resume"], "another trainer", "run-locked"),
    ("out-train-gguf-rope", T, ["--model", "{ws}/hfb", "--data", "{ws}/a.txt", "--ctx", "32", "--steps", "1",
                                "--out", "{ws}/out", "--rope", "dynamic:2", "--merge", "--gguf", "f16"],
     "nothing was trained", "hf-bytes"),
    ("out-train-gguf-byte-tokenizer", T, ["--model", "{ws}/hfb", "--data", "{ws}/a.txt", "--ctx", "32", "--steps",
                                          "1", "--out", "{ws}/out", "--merge", "--gguf", "f16"], "nothing was trained",
     "hf-bytes"),
    ("resume-truncated-adapter", T, [*RESUME, "--lora-r", "2", "--resume"], "--resume-from", "adapter-truncated"),
    ("out-demo-foreign-folder", DM, ["--out", "{ws}/nonempty", "--steps", "1"], "nonempty", None),
    ("out-demo-pretrain-nonempty", DM, ["pretrain", "--out", "{ws}/nonempty", "--steps", "1"], "nonempty", None),
    ("out-compare-foreign-folder", CM, ["--out", "{ws}/nonempty", "--steps", "1"], "nonempty", None),
]


def prepare_outputs(ws: Path, a: Path, what: str):
    """The output-path cases' own setups; returns what to close after the case (or None)."""
    if what == "partial-folder":
        (ws / "s.jsonl.partial").mkdir()
        (ws / "s.jsonl.partial" / "keep.txt").write_text("x")
    elif what in ("eval-json-folder", "eval-png-folder"):
        (ws / "res" / ("ppl.json" if what == "eval-json-folder" else "ppl.png")).mkdir(parents=True)
    elif what == "hf-bytes":  # the tiny HF model with the byte tokenizer recorded beside it
        shutil.copytree(a / "hf", ws / "hfb")
        tokenizer.save_tokenizer("bytes", ws / "hfb")
    elif what == "run-merged-file":
        shutil.copytree(a / "run", ws / "out")
        (ws / "out" / "merged").write_text("not a folder")
    elif what == "run-locked":  # another trainer holds --out (an flock on its own open file)
        shutil.copytree(a / "run", ws / "out")
        fd = os.open(ws / "out" / train_guards.LOCK_NAME, os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return lambda: os.close(fd)
    elif what == "adapter-truncated":
        shutil.copytree(a / "run", ws / "out")
        f = sorted((ws / "out").glob("ckpt-*"))[-1] / "adapter" / "adapter_model.safetensors"
        f.write_bytes(f.read_bytes()[:60])
    return None


OUT_SETUPS = ("partial-folder", "eval-json-folder", "eval-png-folder", "hf-bytes", "run-merged-file", "run-locked",
              "adapter-truncated")


# ----------------------------------------------------------------------------- input side: synth's resume and
# generator flags, eval's inputs and lengths, numbers beyond range, hand-edited state and adapter files.
# A setup here is a function (ws, assets) that writes the bad input into the case's folder.

SYNTH = ["--docs", "{ws}/doc.txt", "--tokenizer", "bytes", "--ctx", "1024", "--out", "{ws}/s.jsonl"]
HUGE = str(10**29)


def synth_partial(ws: Path, row_seed: int = 0, file_seed: int = 0, extra: bytes = b"", settings: bool = True):
    """s.jsonl.partial as an interrupted `data_synth.py SYNTH --seed file_seed` leaves it: the settings line, one
    sample made with row_seed, then `extra`."""
    from tokenizer import ByteTokenizer
    (ws / "doc.txt").write_text("The quick brown fox jumps over the lazy dog.\n" * 60)
    data_synth.synth([ws / "doc.txt"], ByteTokenizer(), 1024, list(data_synth.SYNTH_KINDS), ws / "made.jsonl", n=1, seed=row_seed)
    row = (ws / "made.jsonl").read_bytes()
    (ws / "made.jsonl").unlink()
    head = {"synth_settings": dict(docs=[str((ws / "doc.txt").resolve())], tokenizer="bytes", ctx=1024,
                                   kinds=list(data_synth.SYNTH_KINDS), seed=file_seed, template="chatml", generator=None)}
    (ws / "s.jsonl.partial").write_bytes((json.dumps(head) + "\n").encode() * settings + row + extra)


def edit_json(path: Path, **change) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))


def edited_state(edit):
    """A setup: the finished run with edit(state) applied to its newest trainer_state.json."""
    def setup(ws, a):
        corrupt_run(ws, a, "copy")
        path = sorted((ws / "out").glob("ckpt-*"))[-1] / "trainer_state.json"
        state = json.loads(path.read_text())
        edit(state)
        path.write_text(json.dumps(state))
    return setup


def edited_adapter(**change):
    def setup(ws, a):
        shutil.copytree(a / "adapter", ws / "ad")
        edit_json(ws / "ad" / "adapter_config.json", **change)
    return setup


def haystacks(ws, a):
    (ws / "hay_empty.txt").write_text("")
    (ws / "hay_binary.txt").write_bytes(b"text\n\x00\x01\x02 binary")
    (ws / "hay_latin1.txt").write_bytes(b"caf\xe9\n" * 10)
    (ws / "hay_short.txt").write_text("A short haystack. " * 4)
    (ws / "nodata").mkdir()
    (ws / "nodata" / "weights.bin").write_bytes(b"\x00" * 8)
    chat = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello, how can I help?"}]
    (ws / "chat.jsonl").write_text(json.dumps({"messages": chat}) + "\n")


ByteLevelBPE = json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0, "b": 1}, "merges": []},
                           "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                                             "use_regex": True}})
NEEDLE = ["needle", "--model", "tiny", "--lengths", "512", "--out", "{ws}/out", "--haystack"]
CASES += [
    # data_synth.py: the generator client's numbers
    ("synth-timeout-nan", S, [*SYNTH, "--generator-url", "http://127.0.0.1:9/v1", "--generator-model", "m",
                              "--timeout", "nan"], "--timeout", None),
    ("synth-timeout-negative", S, [*SYNTH, "--generator-url", "http://127.0.0.1:9/v1", "--generator-model", "m",
                                   "--timeout", "-1"], "--timeout", None),
    ("synth-timeout-inf", S, [*SYNTH, "--generator-url", "http://127.0.0.1:9/v1", "--generator-model", "m",
                              "--timeout", "inf"], "--timeout", None),
    ("synth-retries-negative", S, [*SYNTH, "--generator-url", "http://127.0.0.1:9/v1", "--generator-model", "m",
                                   "--retries", "-1"], "--retries", None),
    ("synth-retries-huge", S, [*SYNTH, "--generator-url", "http://127.0.0.1:9/v1", "--generator-model", "m",
                               "--retries", HUGE], "--retries", None),
    ("synth-concurrency-zero", S, [*SYNTH, "--concurrency", "0"], "--concurrency", None),
    ("synth-concurrency-huge", S, [*SYNTH, "--concurrency", "1000000"], "--concurrency", None),
    ("synth-n-huge", S, [*SYNTH, "--n", HUGE], "--n", None),
    # data_synth.py: the progress file it resumes, checked row by row
    ("synth-resume-other-seed", S, SYNTH, "--seed", lambda ws, a: synth_partial(ws, 1, 1)),
    ("synth-resume-foreign-row", S, SYNTH, "s.jsonl.partial:2", lambda ws, a: synth_partial(ws, 1, 0)),
    ("synth-resume-broken-row", S, SYNTH, "s.jsonl.partial:3", lambda ws, a: synth_partial(ws, extra=b"{not json\n")),
    ("synth-resume-not-utf8", S, SYNTH, "s.jsonl.partial:3: not UTF-8",
     lambda ws, a: synth_partial(ws, extra=b'{"failed": "\xff"}\n')),
    ("synth-resume-not-a-row", S, SYNTH, "s.jsonl.partial:3", lambda ws, a: synth_partial(ws, extra=b"[1, 2]\n")),
    ("synth-resume-no-settings", S, SYNTH, "s.jsonl.partial:1", lambda ws, a: synth_partial(ws, settings=False)),
    ("synth-resume-is-folder", S, SYNTH, "s.jsonl.partial", lambda ws, a: synth_partial(ws) or (
        (ws / "s.jsonl.partial").unlink(), (ws / "s.jsonl.partial").mkdir())),
    # eval.py: haystacks read as training data, long enough; templates of the tokenizer; lengths that fit
    ("eval-haystack-empty", E, [*NEEDLE, "{ws}/hay_empty.txt"], "hay_empty.txt:1", haystacks),
    ("eval-haystack-binary", E, [*NEEDLE, "{ws}/hay_binary.txt"], "hay_binary.txt:2", haystacks),
    ("eval-haystack-latin1", E, [*NEEDLE, "{ws}/hay_latin1.txt"], "hay_latin1.txt:1: not UTF-8", haystacks),
    ("eval-haystack-short", E, [*NEEDLE, "{ws}/hay_short.txt"], "--lengths 512", haystacks),
    ("eval-haystack-folder-unreadable", E, [*NEEDLE, "{ws}/nodata"], "nodata", haystacks),
    ("eval-docs-binary", E, ["ppl", "--model", "tiny", "--lengths", "16", "--docs", "{ws}/hay_binary.txt", "--out",
                             "{ws}/out"], "hay_binary.txt:2", haystacks),
    ("eval-template-not-tokenizers", E, ["needle", "--model", "tiny", "--lengths", "512", "--chat-template", "llama-3",
                                         "--out", "{ws}/out"], "<|begin_of_text|>", None),
    ("eval-lengths-beyond-memory", E, ["passkey", "--model", "tiny", "--lengths", str(10**11), "--out", "{ws}/out"],
     "GiB", None),
    ("eval-ppl-beyond-memory", E, ["ppl", "--model", "tiny", "--lengths", HUGE, "--out", "{ws}/out"], "GiB", None),
    # generate.py
    ("generate-tokens-beyond-memory", G, ["--model", "tiny", "--prompt", "hi", "--max-new-tokens", "1000000000"],
     "--max-new-tokens 1000000000", None),
    # train.py and data: numbers beyond range, mixture weights, data that yields nothing and why
    ("pose-huge", T, [*TINY, *DATA, "--pose", HUGE], "--pose", None),
    ("seed-huge", T, [*TINY, *DATA, "--seed", HUGE], "--seed", None),
    ("ctx-beyond-positions", T, ["--model", "tiny", "--tokenizer", "bytes", "--ctx", str(2**60), *DATA], "--ctx", None),
    ("lora-r-beyond-projections", T, [*TINY, *DATA, "--lora-r", "1000000000"], "rank r", None),
    ("data-weight-too-small", T, [*TINY, "--data", "{ws}/a.txt:1e308,{ws}/a.txt:1e-300", "--out", "{ws}/out"],
     "1e-300", None),
    ("data-shorter-than-ctx", T, ["--model", "tiny", "--tokenizer", "bytes", "--ctx", "100000", *DATA],
     "fewer than the 100001", None),
    ("data-folder-unreadable", T, [*TINY, "--data", "{ws}/nodata", "--out", "{ws}/out"], "nodata", haystacks),
    ("data-chat-template-not-tokenizers", T, [*TINY, "--data", "{ws}/chat.jsonl", "--out", "{ws}/out",
                                              "--chat-template", "llama-3"], "llama-3", haystacks),
    # hand-edited trainer_state.json and adapter_config.json
    ("resume-state-step-string", T, [*RESUME, "--lora-r", "2", "--resume"], "'step'",
     edited_state(lambda s: s.update(step="2"))),
    ("resume-state-cursor-empty", T, [*RESUME, "--lora-r", "2", "--resume"], "'data_cursor'",
     edited_state(lambda s: s.update(data_cursor=[]))),
    ("resume-state-cursor-index", T, [*RESUME, "--lora-r", "2", "--resume"], "'index'",
     edited_state(lambda s: s["data_cursor"][0].update(index="x"))),
    ("adapter-r-word", E, ["ppl", "--model", "{a}/hf", "--tokenizer", "bytes", "--adapter", "{ws}/ad", "--out",
                           "{ws}/out"], "'r'",
     edited_adapter(r="eight")),
    ("adapter-alpha-null", L, ["{a}/hf", "{ws}/ad", "{ws}/merged"], "'lora_alpha'", edited_adapter(lora_alpha=None)),
    ("adapter-target-number", L, ["{a}/hf", "{ws}/ad", "{ws}/merged"], "target_modules",
     edited_adapter(target_modules=[7])),
    ("adapter-rslora-word", L, ["{a}/hf", "{ws}/ad", "{ws}/merged"], "'use_rslora'", edited_adapter(use_rslora="no")),
    # found by probing: sizes that would exhaust memory, seeds, malformed tokenizer files and URLs, empty probes
    ("eval-trials-huge", E, ["passkey", "--model", "tiny", "--lengths", "256", "--trials", str(10**12), "--out",
                             "{ws}/out"], "--trials", None),
    ("eval-windows-huge", E, ["ppl", "--model", "tiny", "--lengths", "16", "--windows", str(10**12), "--out",
                              "{ws}/out"], "--windows", None),
    ("eval-seed-huge", E, ["ppl", "--model", "tiny", "--lengths", "16", "--seed", HUGE, "--out", "{ws}/out"], "--seed",
     None),
    ("eval-needle-empty", E, ["needle", "--model", "tiny", "--lengths", "512", "--needle", "", "--out", "{ws}/out"],
     "--needle", None),
    ("tokenizer-config-list", D, ["stats", "{ws}/a.txt", "--tokenizer", "{ws}/tokdir"], "tokenizer_config.json",
     lambda ws, a: (ws / "tokdir").mkdir() or (ws / "tokdir" / "tokenizer.json").write_text(
         ByteLevelBPE) and (ws / "tokdir" / "tokenizer_config.json").write_text("[1, 2]")),
    ("tokenizer-gguf-broken", D, ["stats", "{ws}/a.txt", "--tokenizer", "{ws}/bad.gguf"], "bad.gguf", None),
    ("synth-docs-nul", S, [*SYNTH[:1], "{ws}/hay_binary.txt", *SYNTH[2:]], "hay_binary.txt:2", haystacks),
    ("synth-docs-long-line", S, [*SYNTH[:1], "{ws}/a.txt", *SYNTH[2:]], "line 1 of", None),
    ("synth-generator-ctx-small", S, [*SYNTH, "--generator-url", "http://127.0.0.1:9/v1", "--generator-model", "m"],
     "--ctx 1024", None),
    ("synth-generator-url-malformed", S, [*SYNTH, "--generator-url", "http://[::1", "--generator-model", "m"],
     "--generator-url", None),
]


def listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("name,entry,argv,needle,setup", CASES, ids=[c[0] for c in CASES])
def test_bad_input(name, entry, argv, needle, setup, assets, tmp_path, monkeypatch, capsys):
    ws = tmp_path
    prepare(ws, assets)
    close = None
    if setup == "run":
        shutil.copytree(assets / "run", ws / "out")
    elif setup in OUT_SETUPS:
        close = prepare_outputs(ws, assets, setup)
    elif callable(setup):
        setup(ws, assets)
    elif setup:
        corrupt_run(ws, assets, setup)
    monkeypatch.chdir(ws)
    before = listing(ws)
    args = [x.format(ws=ws, a=assets) for x in argv]
    try:
        code = MAINS[entry](args)
    except SystemExit as e:
        code = e.code
    finally:
        if close is not None:
            close()
    out, err = capsys.readouterr()
    assert code not in (0, None), f"exit code {code}; stdout: {out[-500:]}"
    assert "Traceback" not in out + err
    lines = [l for l in err.splitlines() if l.startswith("error:") or "error:" in l]
    assert lines, f"no error line; stderr: {err[-800:]}"
    assert needle in err, f"{needle!r} not named in: {err.strip()[-600:]}"
    assert listing(ws) == before, f"left behind: {sorted(listing(ws) - before)}"


def test_table_size():
    """The table covers at least 60 distinct bad inputs over every entry point."""
    assert len(CASES) >= 60 and len({c[0] for c in CASES}) == len(CASES)
    assert {c[1] for c in CASES} == set(MAINS)


# ----------------------------------------------------------------------------- guards (fast)


def test_grad_watch_stops_on_non_finite_and_warns_once_on_zero(capsys):
    from train_guards import GradWatch
    from parallel import Dist
    from errors import UserError
    d = Dist(rank=0, local_rank=0, world=1, device=torch.device("cpu"))
    w = GradWatch(d, zero_steps=3)
    for step in range(1, 8):
        w.check(step, torch.tensor(0.0), lambda: None)
    assert capsys.readouterr().err.count("warning: gradient norm is exactly 0") == 1
    with pytest.raises(UserError, match=r"step 9: gradient norm is nan.*ckpt-7"):
        w.check(9, torch.tensor(float("nan")), lambda: Path("ckpt-7"))


# ----------------------------------------------------------------------------- interrupts, resume, full disk (slow)

ROOT = Path(__file__).resolve().parents[1]
RUN = [*TINY, "--lora-r", "2", "--schedule", "constant"]


def start(args, **kw):
    import subprocess
    import sys
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env, **kw)


def finish(args):
    p = start(args)
    out, err = p.communicate(timeout=600)
    return p.returncode, out, err


def metric_lines(out: Path) -> int:
    f = out / "metrics.jsonl"
    return len(f.read_text().splitlines()) if f.is_file() else 0


def wait_for_step(out: Path, k: int, proc, timeout=120.0):
    import time
    t = time.time()
    while metric_lines(out) < k and proc.poll() is None and time.time() - t < timeout:
        time.sleep(0.005)


@pytest.mark.slow
def test_sigint_with_save_every_0_saves_and_resume_is_bit_identical(tmp_path, assets):
    import random
    import signal
    k = random.Random().randint(2, 40)
    args = [*RUN, "--data", str(assets / "text.txt"), "--steps", "120"]
    code, _, err = finish([*args, "--out", str(tmp_path / "whole")])
    assert code == 0, err[-2000:]
    p = start([*args, "--out", str(tmp_path / "cut")])
    wait_for_step(tmp_path / "cut", k, p)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=300)
    assert p.returncode != 0 and "Traceback" not in err, (k, err[-2000:])
    assert "--resume" in err and "checkpoint" in err, err[-1000:]
    assert list((tmp_path / "cut").glob("ckpt-*")), f"no checkpoint after SIGINT at step ~{k}"
    code, _, err = finish([*args, "--out", str(tmp_path / "cut"), "--resume"])
    assert code == 0, err[-2000:]
    a = load_file(str(tmp_path / "whole" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a), f"SIGINT near step {k}"


@pytest.mark.slow
@pytest.mark.parametrize("how", ["sigint-twice", "kill-9"])
def test_interrupted_saves_leave_no_tmp_after_resume(tmp_path, assets, how):
    import random
    import signal
    import time
    rng = random.Random()
    args = [*RUN, "--data", str(assets / "text.txt"), "--steps", "60", "--save-every", "1", "--keep", "2"]
    for trial in range(4):
        out = tmp_path / f"t{trial}"
        p = start([*args, "--out", str(out)])
        wait_for_step(out, rng.randint(1, 20), p)
        time.sleep(rng.random() * 0.01)
        if how == "kill-9":
            p.kill()
        else:
            p.send_signal(signal.SIGINT)
            time.sleep(rng.random() * 0.003)
            p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=300)
        assert p.returncode != 0 and "Traceback" not in err, err[-2000:]
        code, _, err = finish([*args, "--out", str(out), "--resume"])
        assert code == 0, err[-2000:]
        left = [str(q) for q in out.rglob(".tmp-*")]
        assert not left, left


@pytest.mark.slow
def test_resume_with_a_new_lr_logs_it_and_trains_at_it(tmp_path, assets):
    out = tmp_path / "run"
    base = [*RUN, "--data", str(assets / "text.txt"), "--out", str(out)]
    code, _, err = finish([*base, "--steps", "3", "--lr", "1e-3"])
    assert code == 0, err[-2000:]
    code, stdout, err = finish([*base, "--steps", "6", "--lr", "5e-4", "--resume"])
    assert code == 0, err[-2000:]
    assert "--lr 0.001 -> 0.0005" in stdout and "--steps 3 -> 6" in stdout, stdout[-1500:]
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]
    # constant schedule, no warmup: each record's lr is the lr of the step that follows it and of itself
    assert [r["lr"] for r in recs] == [1e-3] * 3 + [5e-4] * 3


@pytest.fixture
def small_disk(tmp_path):
    import subprocess
    d = tmp_path / "disk"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(d)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    yield d
    subprocess.run(["umount", str(d)], check=False)


@pytest.mark.slow
def test_full_disk_is_one_line_and_the_previous_checkpoint_stays(small_disk, assets):
    out = small_disk / "run"
    args = [*RUN, "--data", str(assets / "text.txt"), "--out", str(out), "--save-every", "1", "--keep", "2"]
    code, _, err = finish([*args, "--steps", "2"])
    assert code == 0, err[-2000:]
    ckpt = out / "ckpt-0000002"
    size = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
    st = os.statvfs(small_disk)
    free = st.f_bavail * st.f_frsize
    with open(small_disk / "filler", "wb") as f:  # leave room for metrics lines, not for another checkpoint
        f.write(b"\0" * max(0, free - size // 2))
    code, stdout, err = finish([*args, "--steps", "4", "--resume"])
    errors = [l for l in err.splitlines() if l.startswith("error:")]
    assert code == 1 and "Traceback" not in err and len(errors) == 1, err[-2000:]
    assert "No space left on device" in errors[0], errors
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == 2
    load_file(str(ckpt / "optimizer.safetensors"))
    load_file(str(ckpt / "adapter" / "adapter_model.safetensors"))
    assert not list(out.rglob(".tmp-*"))


# ----------------------------------------------------------------------------- output paths and run control


def run_main(main, argv) -> int:
    try:
        return main(argv) or 0
    except SystemExit as e:
        return e.code or 0


def test_rollback_is_the_branch_that_resume_continues(tmp_path, assets, capsys):
    """--resume-from ckpt-4 moves ckpt-5 and ckpt-6 to OUT/abandoned/ (kept whole), so a later --resume
    continues the rollback's own ckpt-5, not the abandoned branch's ckpt-6."""
    out = tmp_path / "run"
    base = [*RUN, "--data", str(assets / "text.txt"), "--out", str(out), "--save-every", "1", "--keep", "3"]
    assert run_main(train.main, [*base, "--steps", "6"]) == 0
    abandoned = load_file(str(out / "ckpt-0000006" / "adapter" / "adapter_model.safetensors"))
    capsys.readouterr()
    assert run_main(train.main, [*base, "--steps", "5", "--lr", "5e-4", "--resume-from",
                                 str(out / "ckpt-0000004")]) == 0
    assert sorted(p.name for p in (out / "abandoned").iterdir()) == ["ckpt-0000005", "ckpt-0000006"]
    kept = load_file(str(out / "abandoned" / "ckpt-0000006" / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(kept[k], abandoned[k]) for k in abandoned)
    capsys.readouterr()
    assert run_main(train.main, [*base, "--steps", "7", "--lr", "5e-4", "--resume"]) == 0
    stdout = capsys.readouterr().out
    assert f"resumed from {out / 'ckpt-0000005'} at step 5" in stdout, stdout[-1500:]
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6, 7] and recs[4]["lr"] == 5e-4


def test_a_signal_during_the_final_writes_stops_at_once_without_debris(tmp_path):
    import signal
    import time
    from errors import UserError
    from outputs import atomic_path
    from parallel import Dist
    d = Dist(rank=0, local_rank=0, world=1, device=torch.device("cpu"))
    with train_guards.Interrupts(d) as stop:
        with pytest.raises(UserError, match=r"SIGTERM: stopped before the final outputs.*ckpt-7.*--resume"):
            with stop.at_once(tmp_path / "ckpt-7"):
                with atomic_path(tmp_path / "merged", is_dir=True) as tmp:
                    (tmp / "model.safetensors").write_bytes(b"half")
                    os.kill(os.getpid(), signal.SIGTERM)
                    time.sleep(5)  # the handler raises here
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_a_second_trainer_on_the_same_out_is_refused_and_kill_9_leaves_no_stale_lock(tmp_path, assets):
    out = tmp_path / "run"
    args = [*RUN, "--data", str(assets / "text.txt"), "--out", str(out), "--save-every", "1", "--keep", "2"]
    n = 600  # long enough that the first still runs while the second starts (each starts twice: memory_alloc.py)
    first = start([*args, "--steps", str(n)])
    wait_for_step(out, 2, first)
    code, _, err = finish([*args, "--steps", str(n), "--resume"])
    errors = [l for l in err.splitlines() if l.startswith("error:")]
    assert code == 1 and len(errors) == 1 and "another trainer" in errors[0], err[-2000:]
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-2000:]
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(1, n + 1))  # the second trainer truncated nothing
    again = start([*args, "--steps", str(2 * n), "--resume"])
    wait_for_step(out, n + 2, again)
    again.kill()  # kill -9 while it holds the lock
    again.communicate(timeout=60)
    assert (out / train_guards.LOCK_NAME).exists()
    code, _, err = finish([*args, "--steps", str(n + 10), "--resume"])
    assert code == 0, err[-2000:]


@pytest.mark.slow
def test_sigterm_in_the_last_step_with_merge_is_one_line_and_resume_writes_the_outputs(tmp_path, assets):
    import signal
    out = tmp_path / "run"
    args = [*RUN, "--data", str(assets / "text.txt"), "--out", str(out), "--steps", "40", "--merge"]
    p = start(args)
    wait_for_step(out, 39, p)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=300)
    errors = [l for l in err.splitlines() if l.startswith("error:")]
    assert p.returncode == 1 and "Traceback" not in err and len(errors) == 1, err[-2000:]
    assert not list(out.rglob(".tmp-*")) and not (out / "merged").exists()
    code, _, err = finish([*args, "--resume"])
    assert code == 0, err[-2000:]
    assert (out / "merged" / "model.safetensors").is_file() and (out / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_a_full_disk_names_the_file_and_cuts_no_line(small_disk, assets):
    from errors import UserError
    from outputs import append_line
    out = small_disk / "run"
    args = [*RUN, "--data", str(assets / "text.txt"), "--out", str(out), "--save-every", "1", "--keep", "1"]
    code, _, err = finish([*args, "--steps", "2"])
    assert code == 0, err[-2000:]
    with open(small_disk / "filler", "wb", buffering=0) as f:  # fill the disk to the last page
        for size in (4096, 1):
            try:
                while True:
                    f.write(b"\0" * size)
            except OSError:
                pass
    metrics = out / "metrics.jsonl"
    before = metrics.read_bytes()
    with pytest.raises(UserError, match=f"{metrics}: cannot write"):
        append_line(metrics, json.dumps({"step": 3, "pad": "x" * 20000}))
    assert metrics.read_bytes() == before
    code, _, err = finish([*args, "--steps", "4", "--resume"])
    errors = [l for l in err.splitlines() if l.startswith("error:")]
    assert code == 1 and len(errors) == 1 and f"error: {out}" in errors[0], err[-2000:]
    assert "No space left on device" in errors[0] and metrics.read_bytes() == before


@pytest.mark.slow
@pytest.mark.parametrize("case", ["data-missing", "out-locked"])
def test_under_torchrun_one_rank_prints_the_error(tmp_path, assets, case):
    import subprocess
    import sys
    out = tmp_path / "run"
    data = tmp_path / "missing.txt" if case == "data-missing" else assets / "text.txt"
    fd = None
    if case == "out-locked":
        shutil.copytree(assets / "run", out)
        fd = os.open(out / train_guards.LOCK_NAME, os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            str(ROOT / "train.py"), *RUN, "--data", str(data), "--out", str(out), "--steps", "4",
                            "--resume"], capture_output=True, text=True, timeout=600, cwd=ROOT,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    finally:
        if fd is not None:
            os.close(fd)
    errors = [l for l in (r.stdout + r.stderr).splitlines() if l.startswith("error:")]
    assert r.returncode != 0 and len(errors) == 1, (r.stdout + r.stderr)[-3000:]
    assert ("missing.txt" if case == "data-missing" else "another trainer") in errors[0]
