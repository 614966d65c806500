"""PNG figures for bench/allreduce.py and bench/train.py (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import FuncFormatter

MiB = 1 << 20


def _label_size(n: int) -> str:
    return f"{n / MiB:g} MiB" if n >= MiB else f"{n / 1024:g} KiB"


def _color(method: str) -> str:
    if method == "fp32":
        return "0.4"
    if method.startswith("gz:"):
        return "tab:blue"
    return "tab:orange"


def allreduce_plot(doc: dict, png: Path) -> None:
    """Speed-up over fp32 per method (one panel per link and size), and vs link rate."""
    res = [r for r in doc["results"] if "speedup_vs_fp32" in r]
    links = list(dict.fromkeys(r["link"] for r in res))
    sizes = sorted({r["size_bytes"] for r in res})
    panels = [(lk, s) for lk in links for s in sizes]
    shaped = sorted({r["per_rank_bps"] for r in res if r.get("per_rank_bps")})
    extra = 1 if len(shaped) >= 2 else 0
    n = len(panels) + extra
    if n == 0:
        return
    cols = min(2, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(7.5 * cols, 0.32 * 20 * rows + 1),
                             squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax, (lk, s) in zip(flat, panels):
        rr = [r for r in res if r["link"] == lk and r["size_bytes"] == s]
        rr.sort(key=lambda r: r["speedup_vs_fp32"])
        names = [r["method"] for r in rr]
        vals = [r["speedup_vs_fp32"] for r in rr]
        ax.barh(names, vals, color=[_color(m) for m in names])
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
        for i, v in enumerate(vals):
            ax.text(v, i, f" {v:.2f}x", va="center", fontsize=7)
        ax.set_title(f"{doc['world']} ranks, {_label_size(s)} fp32, link {lk}", fontsize=9)
        ax.set_xlabel("speed-up over fp32 all-reduce (median time, log scale)")
        ax.tick_params(axis="y", labelsize=7)
    if extra:
        ax = flat[len(panels)]
        size = max(sizes)
        methods = sorted({r["method"] for r in res if r["size_bytes"] == size
                          and r.get("per_rank_bps")})
        for m in methods:
            pts = sorted((r["per_rank_bps"], r["speedup_vs_fp32"]) for r in res
                         if r["method"] == m and r["size_bytes"] == size
                         and r.get("per_rank_bps"))
            if len(pts) >= 2 and m != "fp32":
                ax.plot([p[0] / 1e9 for p in pts], [p[1] for p in pts], marker="o",
                        label=m, ls="-" if m.startswith("gz:") else "--")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
        ax.set_xlabel("each rank's share of the emulated link (Gbit/s) = bucket rate / W")
        ax.set_ylabel("speed-up over fp32")
        ax.set_title(f"crossover, {_label_size(size)}", fontsize=9)
        ax.legend(fontsize=6, ncol=2)
    for ax in flat[n:]:
        ax.axis("off")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)


def training_plot(doc: dict, png: Path) -> None:
    """Per task: eval loss vs step, vs wall time, and accuracy vs wall time."""
    tasks = list(dict.fromkeys(r["task"] for r in doc["runs"]))
    fig, axes = plt.subplots(len(tasks), 3, figsize=(17, 4.6 * len(tasks)), squeeze=False)
    for row, task in zip(axes, tasks):
        runs = [r for r in doc["runs"] if r["task"] == task and r.get("evals")]
        for r in runs:
            ev = r["evals"]
            style = {"marker": ".", "ms": 3, "lw": 1.1,
                     "ls": "-" if r["method"].startswith("gz:") else "--"}
            if r["method"] == "fp32":
                style.update(color="k", lw=1.8, ls="-")
            if r["method"].endswith(":noef"):
                style.update(ls=":")
            steps = [e["step"] for e in ev]
            wall = [e["wall_s"] for e in ev]
            row[0].plot(steps, [e["loss"] for e in ev], label=r["method"], **style)
            row[1].plot(wall, [e["loss"] for e in ev], label=r["method"], **style)
            row[2].plot(wall, [e["acc"] for e in ev], label=r["method"], **style)
        link = doc.get("link", "?")
        row[0].set_title(f"{task}: training-set loss vs step", fontsize=9)
        row[1].set_title(f"{task}: loss vs wall time (link {link})", fontsize=9)
        row[2].set_title(f"{task}: held-out accuracy vs wall time", fontsize=9)
        row[0].set_xlabel("step")
        row[1].set_xlabel("wall time of training steps (s)")
        row[2].set_xlabel("wall time of training steps (s)")
        for ax in row[:2]:
            ax.set_yscale("log")
            ax.set_ylabel("loss")
        row[2].set_ylabel("accuracy")
        row[0].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
