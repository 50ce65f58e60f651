"""train_config.py: the TrainConfig fields, the recipes checked against them and against the README's table, the
parser built from the fields, and resolve()'s order and checks."""
import dataclasses
import math
import re
from pathlib import Path

import pytest

import train_config
from train_config import RECIPES, TrainConfig
from errors import UserError

ROOT = Path(__file__).resolve().parents[1]
BASE = {"model": "tiny", "ctx": 64, "data": "x.txt"}

# The settings and defaults of the trainer before TrainConfig (a golden copy: the names and defaults that
# existing checkpoints' trainer_state.json carry).
OLD_DEFAULTS = dict(
    model=None, data=None, ctx=None, quant="none", dtype=None, lora_r=8, lora_alpha=16.0, lora_dropout=0.0,
    lora_targets="q_proj,k_proj,v_proj,o_proj", train="", rslora=False, rope=None, rope_theta=None, attn="full",
    group_ratio=0.25, full_attn_tail=0.0, lr=2e-4, warmup=0, schedule="cosine", weight_decay=0.0, clip=1.0,
    steps=None, epochs=None, grad_accum=1, seed=0, compile=False, checkpointing=True, offload=False, loss_chunk=1024,
    mlp_chunk=0, save_attention=False, out="runs/train", save_every=0, keep=2, resume=False, resume_from=None, merge=False,
    gguf=None, tokenizer=None, chat_template=None, truncate=False, nproc=None, log_every=1)
ADDED = dict(cp=1, fsdp=False, doc_mask=False, pose=None, nccl_timeout=60.0)  # settings added since, after the old ones; a checkpoint without them reads their default
OLD_IDENTITY = ("model", "ctx", "quant", "lora_r", "lora_alpha", "lora_targets", "train", "rope", "rope_theta",
                "attn", "group_ratio", "full_attn_tail", "data", "seed", "grad_accum", "dtype", "world_size", "rslora")


# ----------------------------------------------------------------------------- fields


def test_fields_keep_the_settings_defaults_and_checkpoint_keys():
    assert train_config.DEFAULTS == {**OLD_DEFAULTS, **ADDED}
    assert list(train_config.DEFAULTS) == [*OLD_DEFAULTS, *ADDED]  # the printed/saved order
    assert set(train_config.IDENTITY) == set(OLD_IDENTITY) | {"cp", "doc_mask", "pose"}
    cfg = train_config.resolve(BASE)
    assert list(cfg.to_dict()) == [*OLD_DEFAULTS, *ADDED, "recipe", "world_size"]  # trainer_state.json's "config"
    assert TrainConfig(**cfg.to_dict()) == cfg


def test_every_setting_has_help_and_a_flag():
    ap = train_config.build_parser()
    flags = {o for a in ap._actions for o in a.option_strings}
    for name in train_config.SETTINGS:
        assert train_config.FIELDS[name].metadata["help"], name
        assert train_config.flag(name) in flags, name
    assert {"--recipe", "--dry-run", "--suggest-base", "--rope", "--rope-theta", "--nproc", "--no-checkpointing"} <= flags


def test_recipes_are_checked_against_the_fields():
    train_config.check_recipes(RECIPES)
    with pytest.raises(ValueError, match="lora_rank"):
        train_config.check_recipes({"bad": {"lora_rank": 8}})
    with pytest.raises(ValueError, match="lr"):
        train_config.check_recipes({"bad": {"lr": "fast"}})
    with pytest.raises(ValueError, match="attn"):
        train_config.check_recipes({"bad": {"attn": "sparse"}})
    with pytest.raises(ValueError, match="world_size"):  # derived, not a setting
        train_config.check_recipes({"bad": {"world_size": 2}})


# ----------------------------------------------------------------------------- parser


def test_parser_leaves_out_what_is_not_given():
    args = vars(train_config.build_parser().parse_args([]))
    assert args == {"dry_run": False, "force": False, "suggest_base": None}
    args = vars(train_config.build_parser().parse_args(
        ["--recipe", "longqlora", "--lora-r", "4", "--no-checkpointing", "--rope", "yarn:4", "--rope-theta", "2e8",
         "--epochs", "0.5", "--rslora", "--dry-run", "--nproc", "8"]))
    assert args == {"recipe": "longqlora", "lora_r": 4, "checkpointing": False, "rope": "yarn:4", "rope_theta": 2e8,
                    "epochs": 0.5, "rslora": True, "dry_run": True, "force": False, "nproc": 8, "suggest_base": None}


def test_parser_rejects_an_unknown_recipe_and_choice(capsys):
    for argv in (["--recipe", "magic"], ["--attn", "sparse"], ["--lora-r", "x"]):
        with pytest.raises(SystemExit) as e:
            train_config.build_parser().parse_args(argv)
        assert e.value.code == 2
    assert "invalid choice: 'magic'" in capsys.readouterr().err


def test_help_lists_the_recipes():
    text = train_config.build_parser().format_help()
    for name in RECIPES:
        assert name in text
    assert "--rope linear:auto" in text


# ----------------------------------------------------------------------------- resolve


def test_resolve_order_defaults_recipe_given():
    cfg = train_config.resolve({**BASE, "lr": 1e-3}, "longqlora")
    assert (cfg.lora_r, cfg.grad_accum, cfg.clip, cfg.lr, cfg.rope, cfg.recipe) == (64, 16, 0.3, 1e-3, "linear:auto",
                                                                                  "longqlora")
    assert train_config.resolve(BASE).steps == 100  # neither steps nor epochs
    cfg = train_config.resolve({**BASE, "steps": 5}, "llama3-80k")  # given steps replace the recipe's epochs
    assert (cfg.steps, cfg.epochs) == (5, None)
    cfg = train_config.resolve({**BASE, "epochs": 2.0}, "longlora")  # given epochs replace the recipe's steps
    assert (cfg.steps, cfg.epochs) == (None, 2.0)
    assert train_config.resolve({**BASE, "lr": None}).lr == 2e-4  # None = not given
    assert train_config.resolve(BASE, world_size=4).world_size == 4
    assert train_config.resolve({"model": "tiny", "ctx": 64, "nproc": 8}, dry_run=True).world_size == 8
    with pytest.raises(ValueError, match="lora_rank"):
        train_config.resolve({**BASE, "lora_rank": 4})  # a programming error, not the user's


@pytest.mark.parametrize("given,needle", [
    ({"model": None}, "--model is required"),
    ({"ctx": 1}, "--ctx must be"),
    ({"data": None}, "--data is required"),
    ({"steps": 2, "epochs": 1.0}, "--steps and --epochs conflict"),
    ({"lora_r": 0}, "--lora-r must be >= 1"),
    ({"grad_accum": 0}, "--grad-accum must be >= 1"),
    ({"loss_chunk": 0}, "--loss-chunk must be >= 1"),
    ({"keep": 0}, "--keep must be >= 1"),
    ({"log_every": 0}, "--log-every must be >= 1"),
    ({"mlp_chunk": -1}, "--mlp-chunk must be >= 0"),
    ({"save_every": -1}, "--save-every must be >= 0"),
    ({"epochs": 0.0}, "--epochs must be > 0"),
    ({"nproc": 0}, "--nproc must be >= 1"),
    ({"steps": 0}, "--steps must be >= 1"),
    ({"full_attn_tail": 1.0}, "--full-attn-tail must be in [0, 1)"),
    ({"full_attn_tail": 0.5}, "--full-attn-tail only applies with --attn s2"),
    ({"group_ratio": 0.0}, "--group-ratio must be in (0, 1]"),
    ({"rope_theta": -1.0}, "--rope-theta must be positive"),
    ({"rope_theta": math.inf}, "--rope-theta must be positive"),
    ({"rope_theta": math.nan}, "--rope-theta must be positive"),
    ({"rope": "wobbly:3"}, "--rope 'wobbly:3'"),
    ({"rope": "linear:0.5"}, "--rope 'linear:0.5'"),
    ({"cp": 0}, "--cp must be >= 1"),
    ({"cp": 2}, "--cp 2 does not divide the world size 1"),
    ({"pose": 64}, "--pose must be a target length > --ctx 64"),
    ({"pose": 640, "doc_mask": True}, "--pose and --doc-mask conflict"),
])
def test_resolve_errors_name_the_flag(given, needle):
    with pytest.raises(UserError) as e:
        train_config.resolve({**BASE, **given})
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_resolve_checks_cp_against_world_and_ctx():
    assert train_config.resolve({**BASE, "cp": 2}, world_size=4).cp == 2
    with pytest.raises(UserError, match=r"^--ctx 66 is not divisible by --cp 4; use a multiple of 4$"):
        train_config.resolve({**BASE, "cp": 4, "ctx": 66}, world_size=4)
    with pytest.raises(UserError, match=r"--cp 3 does not divide the world size 8 \(--nproc\)"):
        train_config.resolve({"model": "tiny", "ctx": 64, "cp": 3, "nproc": 8}, dry_run=True)


def test_resolve_accepts_every_recipe_and_rope_spelling():
    for name in RECIPES:
        assert train_config.resolve(BASE, name).recipe == name
    for spec in ("linear:auto", "yarn:auto", "yarn:8,beta_fast=16", "llama3:8", "none", "default"):
        assert train_config.resolve({**BASE, "rope": spec}).rope == spec
    with pytest.raises(UserError, match="--recipe"):
        train_config.resolve(BASE, "magic")


def test_doc_mask_and_pose_compose_with_s2_and_the_rope_methods():
    assert train_config.resolve({**BASE, "doc_mask": True, "attn": "s2"}).doc_mask
    for spec in ("linear:auto", "yarn:auto", "dynamic:4", "ntk:8", "llama3:8", None):
        cfg = train_config.resolve({**BASE, "pose": 640, "rope": spec, "quant": "nf4", "attn": "s2"})
        assert (cfg.pose, cfg.rope) == (640, spec)
    assert {"--doc-mask", "--pose"} <= {o for a in train_config.build_parser()._actions for o in a.option_strings}
    with pytest.raises(UserError, match="--doc-mask does not combine with --cp 2"):
        train_config.resolve({**BASE, "doc_mask": True, "cp": 2}, world_size=2)
    assert train_config.resolve({**BASE, "pose": 640, "cp": 2}, world_size=2).pose == 640  # shards carry PoSE positions


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        train_config.resolve(BASE).lr = 1.0


# ----------------------------------------------------------------------------- the README's recipe table


def readme_recipes() -> dict[str, dict[str, str]]:
    """The `## Recipes` table of README.md: recipe name -> {column header: cell}."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Recipes\n", 1)[1].split("\n## ", 1)[0]
    lines = section.strip().splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith("|"))
    rows = []
    for l in lines[start:]:  # the first table only
        if not l.startswith("|"):
            break
        rows.append(l)
    cells = [[c.strip() for c in r.strip("|").split("|")] for r in rows]
    header, body = cells[0], cells[2:]
    return {row[0].strip("`"): dict(zip(header, row)) for row in body}


def number(text: str) -> float:
    """'500K' -> 5e5, '200M' -> 2e8, '5e-5' -> 5e-5."""
    m = re.fullmatch(r"([\d.e-]+)([KM]?)", text)
    return float(m.group(1)) * {"": 1, "K": 1e3, "M": 1e6}[m.group(2)]


def expected_from_row(row: dict[str, str]) -> dict:
    """The settings a README row states; what it leaves unsaid must be the default."""
    d = train_config.DEFAULTS
    base, adapters, positions = row["base"], row["adapters"], row["positions"]
    attention, opt = row["attention in training"], row["optimisation"]
    want = {"quant": "nf4" if "NF4" in base else "none"}
    want["lora_r"] = int(re.search(r"r=(\d+)", adapters).group(1))
    m = re.search(r"α=([\d.]+)", adapters)
    want["lora_alpha"] = float(m.group(1)) if m else d["lora_alpha"]
    m = re.search(r"dropout ([\d.]+)", adapters)
    want["lora_dropout"] = float(m.group(1)) if m else d["lora_dropout"]
    if "on all linear layers" in adapters:
        want["lora_targets"] = "all-linear"
    else:
        letters = re.search(r"on ([a-z](?:,[a-z])*)\b", adapters).group(1).split(",")
        want["lora_targets"] = ",".join(f"{c}_proj" for c in letters)
    extras = set()
    if re.search(r"trained embeddings?\b", adapters):
        extras.add("embed")
    if re.search(r"\bnorms\b", adapters):
        extras.add("norm")
    want["train"] = extras
    m = re.search(r"RoPE base (\S+) → (\S+)", positions)
    if m:
        want["rope"], want["rope_theta"] = d["rope"], number(m.group(2))
    else:
        assert positions.startswith(("Position Interpolation", "PI")), positions
        want["rope"], want["rope_theta"] = "linear:auto", d["rope_theta"]
    want["attn"] = "s2" if "S²-Attn" in attention else "full"
    m = re.search(r"group = ctx/(\d+)", attention)
    want["group_ratio"] = 1 / int(m.group(1)) if m else d["group_ratio"]
    want["lr"] = float(re.search(r"lr ([\d.e-]+)", opt).group(1))
    m_steps, m_epochs = re.search(r"(\d+) steps", opt), re.search(r"(\d+) epochs?", opt)
    want["steps"] = int(m_steps.group(1)) if m_steps else None
    want["epochs"] = float(m_epochs.group(1)) if m_epochs else None
    m = re.search(r"grad-accum (\d+)", opt)
    want["grad_accum"] = int(m.group(1)) if m else d["grad_accum"]
    m = re.search(r"clip ([\d.]+)", opt)
    want["clip"] = float(m.group(1)) if m else d["clip"]
    m = re.search(r"warmup (\d+)", opt)
    if m:
        want["warmup"] = int(m.group(1))
    return want


def test_readme_recipe_table_matches_recipes():
    rows = readme_recipes()
    assert set(rows) == set(RECIPES)
    for name, row in rows.items():
        cfg = train_config.resolve(BASE, name)
        want = expected_from_row(row)
        got = {k: getattr(cfg, k) for k in want}
        got["train"] = {t for t in cfg.train.split(",") if t}
        assert got == want, name


def test_save_attention_with_compile_is_refused():
    from train_config import resolve
    with pytest.raises(UserError, match="--save-attention does not combine with --compile"):
        resolve({"model": "tiny", "ctx": 64, "data": "x", "compile": True, "save_attention": True})
