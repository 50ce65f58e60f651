"""The code's shape, checked: layers point one way, modules stay single-purpose and short.

Walks the top-level modules' imports with `ast` (no module is imported, so a broken module still gets a
clear report here):
  - no import cycle among the top-level modules (Tarjan's strongly connected components);
  - no module imports another module's `_underscore` name;
  - project modules are imported at the top of a file, never inside a function (lazy imports are kept
    for optional third-party packages only);
  - the layer table below is respected: a module imports only modules of a lower layer;
  - no top-level module is longer than MAX_LINES;
  - module names group, so `ls` shows families side by side (CARD_NAMES, GROUPS, STANDALONE);
  - no two top-level modules define a function or class under the same public name.
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 560

# Lower number = lower layer (docs/design.md, "How the code is layered"). Modules of one layer may import each
# other only where listed in SAME_LAYER (one direction each).
LAYERS = {
    "errors": 0, "outputs": 0,
    "rope": 1, "tiles": 1, "shift_attn": 1, "quant4": 1, "loss": 1, "doc_attn": 1, "pose": 1, "devices": 1,
    "model": 2,
    "gguf_read": 3,  # GGUF files: config, tensors, vocabulary; below checkpoint and tokenizer, which call it
    "checkpoint": 3, "lora": 3, "lora_peft": 3,
    "tokenizer": 4, "data": 4, "data_resumable": 4, "data_synth": 4,
    "eval_tasks": 4, "eval_ruler": 4, "eval_ruler_qa": 4, "eval_protocols": 4,
    "generate": 4, "gguf_export": 4,
    "parallel": 5, "parallel_fsdp": 5, "memory_plan": 5, "train_config": 5, "train_guards": 5, "train_state": 5,
    "eval_report": 5,  # tables and plots of eval.py's results
    "eval_harness": 5,  # lm-eval over a model eval.py loads; knows only generate and checkpoint
    "eval": 6, "train": 6,  # `python train.py` with no --model hands its process to a driver (never imports it)
    "memory_alloc": 0,  # standard library only: commands import it before torch
    "memory_peak": 1,
    "demo": 7, "demo_smollm2": 7,  # drivers: run train.train and eval
    "demo_compare": 8,  # trains each method through train.train beside the demo's base
}
SAME_LAYER = {("lora", "checkpoint"), ("checkpoint", "gguf_read"), ("lora_peft", "lora"), ("lora_peft", "checkpoint"),
              ("data", "tokenizer"), ("data_synth", "data"), ("data_synth", "tokenizer"),
              ("data_synth", "generate"), ("generate", "tokenizer"), ("eval_tasks", "data"), ("eval_tasks", "tokenizer"),
              ("eval_ruler", "eval_tasks"), ("eval_ruler", "tokenizer"), ("eval_ruler", "data"), ("eval_ruler", "eval_ruler_qa"),
              ("memory_plan", "train_config"),
              ("memory_plan", "parallel"), ("train_config", "parallel"), ("parallel_fsdp", "parallel"),
              ("train_guards", "parallel"), ("outputs", "errors"),
              ("train_state", "parallel"), ("train_state", "train_config"), ("train_state", "train_guards"),
              ("gguf_export", "tokenizer"), ("doc_attn", "shift_attn"), ("tiles", "rope"),
              ("eval_protocols", "eval_tasks"), ("eval_protocols", "data"), ("eval_protocols", "tokenizer"),
              ("data_synth", "data_resumable"), ("data_resumable", "data")}


# The card's eight module names; every other top-level module starts with a group prefix or is standalone.
CARD_NAMES = {"model", "rope", "lora", "quant4", "shift_attn", "train", "data", "eval"}
GROUPS = {
    "train_": "the trainer's configuration, guards and resumable state",
    "memory_": "memory: the predicted plan, measured peaks, the CPU allocator",
    "eval_": "evaluation tasks, protocols, RULER, reports and the lm-eval bridge",
    "data_": "data beyond readers and packing: synthesis, resumable output",
    "demo_": "drivers above the trainer beside the built-in demo",
    "gguf_": "GGUF files, read and written",
    "lora_": "LoRA adapter files",
    "parallel_": "process groups and meshes beyond parallel.py",
}
STANDALONE = {
    "errors": "the one user-error type and its command-line runner; everything imports it",
    "outputs": "atomic writes and output-path checks shared by every command",
    "devices": "device and dtype choice of every entry point",
    "tiles": "token tiles of a block (ALST's tiling), recomputed in backward: math beside rope and model",
    "checkpoint": "safetensors files and load_model: the loader every side uses",
    "tokenizer": "tokenizer backends and chat templates: the text side's base",
    "generate": "prefill and sampling, used by evaluation, data synthesis and the demos alike",
    "parallel": "torchrun process groups, meshes and context parallelism, used by training and memory_plan",
    "loss": "chunked cross-entropy, a math module next to rope and quant4",
    "pose": "PoSE position ids, a math module of its own paper",
    "doc_attn": "attention within packed documents, a math module beside shift_attn",
    "demo": "the built-in demo the demo_ drivers build on",
}


def modules() -> dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text(), str(p)) for p in sorted(ROOT.glob("*.py"))}


def project_imports(tree: ast.Module, names: set[str]) -> list[tuple[str, list[str], bool]]:
    """(module, imported names, at top level) for every import of a project module."""
    top = set(map(id, tree.body))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in names:
                    out.append((a.name.split(".")[0], [], id(node) in top))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.split(".")[0] in names:
            out.append((node.module.split(".")[0], [a.name for a in node.names], id(node) in top))
    return out


def test_every_module_is_in_the_layer_table():
    assert set(modules()) == set(LAYERS), "add the new module to LAYERS (and a line to the README's file map)"


def test_layers_point_one_way_and_imports_are_public_and_at_top():
    mods = modules()
    problems = []
    for name, tree in mods.items():
        for dep, imported, at_top in project_imports(tree, set(mods)):
            if dep == name:
                continue
            if not at_top:
                problems.append(f"{name} imports {dep} inside a function")
            for n in imported:
                if n.startswith("_"):
                    problems.append(f"{name} imports the private name {dep}.{n}")
            if LAYERS[dep] > LAYERS[name] or (LAYERS[dep] == LAYERS[name] and (name, dep) not in SAME_LAYER):
                problems.append(f"{name} (layer {LAYERS[name]}) imports {dep} (layer {LAYERS[dep]})")
    assert not problems, "\n".join(problems)


def test_no_import_cycle():
    mods = modules()
    graph = {n: {d for d, _, _ in project_imports(t, set(mods)) if d != n} for n, t in mods.items()}
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_modules_are_short():
    long = {p.name: n for p in ROOT.glob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_module_names_group():
    names = set(modules())
    loose = sorted(n for n in names - CARD_NAMES - set(STANDALONE) if not n.startswith(tuple(GROUPS)))
    assert not loose, f"give these modules a group prefix ({', '.join(GROUPS)}) or list them in STANDALONE: {loose}"
    stale = sorted(set(STANDALONE) - names) + sorted(n for n in set(STANDALONE) & names
                                                     if n in CARD_NAMES or n.startswith(tuple(GROUPS)))
    assert not stale, f"STANDALONE lists modules that are gone or already grouped: {stale}"


def test_public_names_are_unique_across_modules():
    """No two top-level modules define a function or class under the same public name, so a name found in
    one file says which file holds it. `main` is exempt: it is the command convention (`python X.py` runs
    X.main)."""
    owners: dict[str, list[str]] = {}
    for module, tree in modules().items():
        for node in tree.body:
            defines = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
            if defines and not node.name.startswith("_"):
                owners.setdefault(node.name, []).append(module)
    shared = {name: mods for name, mods in owners.items() if len(mods) > 1 and name != "main"}
    assert not shared, f"public names defined in more than one module: {shared}"
