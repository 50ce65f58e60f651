"""Reports of an evaluation: the markdown tables `eval.py` prints and the PNG it writes beside its JSON.

Retention (Gao et al. 2024, "How to Train Long-Context Language Models (Effectively)": keep short-context
ability): each row's score at the base's own length as a fraction of the first row's, 1 = kept.
Tables name rows by model, adapter and RoPE; RULER rows carry each task's standard error (eval_ruler.cell_text).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

import eval_ruler
from outputs import save_figure

PLOT_DPI = 80


def label(row: dict) -> str:
    name = Path(row["model"]).name if os.sep in row["model"] else row["model"]
    ad = f"+{Path(row['adapter']).name}" if row["adapter"] else ""
    return f"{name}{ad} rope={row['rope']}"


def retention(task: str, values: list[float]) -> list[float | None]:
    """Each row's score at the reference length as a fraction of the first row's, "1 = kept, above 1 =
    better" for every task: first ppl / row ppl for perplexity (lower is better), row accuracy / first
    accuracy for the probes (None when the first row scores 0)."""
    ref = values[0]
    if task == "ppl":
        return [ref / v for v in values]
    return [v / ref if ref > 0 else None for v in values]


def retention_cell(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}x"


def markdown_table(task: str, rows: list[dict], lengths: list[int], retain_at: int | None = None) -> str:
    """One line per row; with several rows a last column `retained@N`: retention() against the first row at
    N = retain_at (the base's own length, --base-length), by default the shortest length."""
    metric = "ppl" if task == "ppl" else "accuracy"
    at = retain_at or min(lengths)
    kept = retention(task, [r["by_length"][at][metric] for r in rows]) if len(rows) > 1 else None
    extra = [f"retained@{at} vs first row"] if kept else []
    heads = [str(L) for L in lengths] + extra
    lines = ["| model | " + " | ".join(heads) + " |", "|---" * (len(heads) + 1) + "|"]
    for i, r in enumerate(rows):
        cells = []
        for L in lengths:
            m = r["by_length"][L]
            rouge = [f" ({n} {m[k]:.2f})" for k, n in (("rouge_l_recall", "R"), ("rouge_l_f", "ROUGE-L F")) if k in m]
            cells.append(f"{m[metric]:.3f}" + "".join(rouge))
        cells += [retention_cell(kept[i])] if kept else []
        lines.append(f"| {label(r)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ruler_table(rows: list[dict], lengths: list[int], retain_at: int | None = None, haystack: str = "") -> str:
    """Per-task score (RULER's metric) +- its standard error of each row, one line per (row, task), then the
    average over tasks (named RULER only when all 13 ran); with several rows a last column: the task's
    retention() against the first row at retain_at (default: shortest)."""
    at = retain_at or min(lengths)
    extra = [f"retained@{at} vs first row"] if len(rows) > 1 else []
    heads = [str(L) for L in lengths] + extra
    lines = ["| model | task | " + " | ".join(heads) + " |", "|---" * (len(heads) + 2) + "|"]
    for r in rows:
        for task, by_length in [*r["by_task"].items(), (r["average"]["name"] + haystack, r["average"])]:
            cells = [eval_ruler.cell_text(by_length[L]) for L in lengths]
            if extra:
                first = rows[0]["by_task"].get(task, rows[0]["average"])[at]["score"]
                cells.append(retention_cell(retention("ruler", [first, by_length[at]["score"]])[1]))
            lines.append(f"| {label(r)} | {task} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(task: str, rows: list[dict], args, path: Path) -> str | None:
    """PNG of the results; returns a note instead when matplotlib is absent."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed; no plot written"
    if task == "ppl":
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for r in rows:
            ax.plot(args.lengths, [r["by_length"][L]["ppl"] for L in args.lengths], marker="o", label=label(r))
        ax.set(xscale="log", yscale="log", xlabel="context length (tokens)", ylabel="perplexity")
        ax.set_xticks(args.lengths, [str(L) for L in args.lengths])
        ax.minorticks_off()
        ax.legend(fontsize=7)
    else:
        fig, axes = plt.subplots(1, len(rows), figsize=(3 + 2.5 * len(rows), 3), squeeze=False)
        for ax, r in zip(axes[0], rows):
            if task == "ruler":  # tasks x lengths
                names = list(r["by_task"])
                grid = torch.tensor([[r["by_task"][n][L]["score"] for L in args.lengths] for n in names])
                ylabels, ylabel = names, "RULER task"
            else:  # depths x lengths
                grid = torch.zeros(len(args.depths), len(args.lengths))
                for it in r["items"]:
                    grid[args.depths.index(it["depth"]), args.lengths.index(it["length"])] += it["correct"] / args.trials
                ylabels, ylabel = [f"{d:.0%}" if d is not None else "random" for d in args.depths], "depth"
            im = ax.imshow(grid.numpy(), cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
            ax.set_xticks(range(len(args.lengths)), [str(L) for L in args.lengths])
            ax.set_yticks(range(len(ylabels)), ylabels)
            ax.set(xlabel="context length (tokens)", ylabel=ylabel, title=label(r))
            ax.title.set_fontsize(7)
        fig.colorbar(im, ax=axes[0].tolist(), label="accuracy")
    save_figure(fig, path, dpi=PLOT_DPI, bbox_inches="tight")
    plt.close(fig)
    return None
