"""PNG figures for bench/allreduce.py and bench/train.py (matplotlib, Agg backend)."""

from __future__ import annotations

import statistics
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


_NICE = (0.1, 0.2, 0.3, 0.5, 1, 2, 3, 5, 10, 20, 30, 50, 100)


def _nice_ticks(ax, axis: str, lo: float, hi: float, fmt: str) -> None:
    ticks = [t for t in _NICE if lo * 0.8 <= t <= hi * 1.25] or [1]
    getattr(ax, f"set_{axis}ticks")(ticks)
    getattr(ax, f"{axis}axis").set_major_formatter(FuncFormatter(lambda v, _: fmt.format(v)))
    getattr(ax, f"{axis}axis").set_minor_formatter(FuncFormatter(lambda v, _: ""))


def allreduce_plot(doc: dict, png: Path) -> None:
    """Bars of speed-up over fp32 per method (one panel per link and size); with three or
    more shaped links, speed-up against link rate instead, with the bandwidth model."""
    res = [r for r in doc["results"] if "speedup_vs_fp32" in r]
    world = doc["world"]
    shaped = sorted({r["per_rank_bps"] for r in res if r.get("per_rank_bps")})
    if len(shaped) >= 3:
        _crossover_plot(doc, res, shaped, world, png)
        return
    links = list(dict.fromkeys(r["link"] for r in res))
    sizes = sorted({r["size_bytes"] for r in res})
    if len(links) == 1 and len(sizes) >= 3:
        _sizes_plot(doc, res, links[0], sizes, world, png)
        return
    panels = [(lk, s) for lk in links for s in sizes]
    if not panels:
        return
    cols = min(2, len(panels))
    rows = -(-len(panels) // cols)
    nbars = max(len([r for r in res if r["link"] == lk and r["size_bytes"] == s])
                for lk, s in panels)
    fig, axes = plt.subplots(rows, cols, figsize=(7.5 * cols, (0.3 * nbars + 1.2) * rows),
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
        # gradzip's wire-bytes limit (fp32 ring bytes over its own) as a tick on its bar.
        limits = [(i, r["wire_limit"]) for i, r in enumerate(rr)
                  if r.get("wire_limit") and r["method"].startswith("gz:")]
        if limits:
            ax.plot([v for _, v in limits], [i for i, _ in limits], ls="none", marker="|",
                    ms=9, mew=1.5, color="tab:red", label="wire-bytes limit")
            ax.legend(fontsize=7, loc="lower right")
        span = vals + [v for _, v in limits]
        _nice_ticks(ax, "x", min(span), max(span), "{:g}x")
        for i, v in enumerate(vals):
            ax.text(v, i, f" {v:.2f}x", va="center", fontsize=7)
        per = rr[0].get("per_rank_bps")
        share = f" ({per / 1e9:g} Gbit/s per rank)" if per else ""
        ax.set_title(f"{world} ranks, {_label_size(s)} fp32, link {lk}{share}", fontsize=9)
        ax.set_xlabel("speed-up over fp32 all-reduce (median time, log scale)")
        ax.tick_params(axis="y", labelsize=7)
    for ax in flat[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)


def _sizes_plot(doc, res, link, sizes, world, png: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 5))
    for m in sorted({r["method"] for r in res if r["method"] != "fp32"}):
        pts = sorted((r["size_bytes"], r["speedup_vs_fp32"]) for r in res if r["method"] == m)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axhspan(0.9, 1.0, color="0.85", zorder=0, label="within 10% of fp32")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(sizes)
    ax.set_xticklabels([_label_size(x) for x in sizes], fontsize=8)
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    ys = [r["speedup_vs_fp32"] for r in res]
    _nice_ticks(ax, "y", min(ys), max(ys), "{:g}x")
    ax.set_xlabel("tensor size (fp32)")
    ax.set_ylabel("speed-up over fp32 all-reduce")
    where = "unshaped loopback" if link == "none" else f"link {link}"
    ax.set_title(f"{world} ranks, {where}: gradzip algorithm=\"auto\" vs fp32", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)


def _crossover_plot(doc, res, shaped, world, png: Path) -> None:
    size = max(r["size_bytes"] for r in res)
    methods = sorted({r["method"] for r in res if r["size_bytes"] == size
                      and r["method"] != "fp32"})
    fig, ax = plt.subplots(figsize=(8, 5.2))
    x_none = shaped[-1] * 2
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    # One colour per codec, one line style per algorithm (when several are measured).
    codecs = list(dict.fromkeys(m.rsplit(":", 1)[0] for m in methods))
    algo_style = {"auto": ("-", "o"), "alltoall": ("--", "^"), "allgather": ("-.", "v"),
                  "plain": (":", "x")}
    for i, m in enumerate(methods):
        codec, algo = m.rsplit(":", 1) if m.startswith("gz:") else (m, "")
        color = colors[codecs.index(codec) % len(colors)] if codec in codecs else colors[0]
        ls, mk = algo_style.get(algo, ("-", "o"))
        rr = [r for r in res if r["method"] == m and r["size_bytes"] == size]
        pts = sorted((r["per_rank_bps"] / 1e9, r["speedup_vs_fp32"]) for r in rr
                     if r.get("per_rank_bps"))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=mk, ls=ls, color=color,
                label=m)
        none = [r for r in rr if not r.get("per_rank_bps")]
        if none:
            ax.plot([x_none / 1e9], [none[0]["speedup_vs_fp32"]], marker=mk, color=color)
        if algo not in ("auto", ""):
            continue  # the model once per codec (for "auto", or the one method measured)
        # Bandwidth model, per rank's share x: t_fp32 = bytes_fp32/x and
        # t_gz = compress + decompress + bytes_gz/x, with the medians over the shaped runs.
        runs = [r for r in rr if r.get("per_rank_bps") and "split" in r]
        f32 = {r["per_rank_bps"]: r for r in res if r["method"] == "fp32"
               and r["size_bytes"] == size and r.get("per_rank_bps")}
        if runs and all(r["per_rank_bps"] in f32 for r in runs):
            cd = statistics.median(r["split"]["compress_s"] + r["split"]["decompress_s"]
                                   for r in runs)
            b32 = statistics.median(f32[r["per_rank_bps"]]["bytes_per_rank_measured"]
                                    for r in runs)
            bgz = statistics.median(r["bytes_per_rank_measured"] for r in runs)
            xs = [shaped[0] * (x_none / shaped[0]) ** (k / 40) for k in range(41)]
            ys = [(b32 * 8 / x) / (cd + bgz * 8 / x) for x in xs]
            ax.plot([x / 1e9 for x in xs], ys, ls=":", color=color, lw=1)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    xt = [x / 1e9 for x in shaped] + [x_none / 1e9]
    ax.set_xticks(xt)
    ax.set_xticklabels([f"{x:g}" for x in xt[:-1]] + ["unshaped"])
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    ys = [r["speedup_vs_fp32"] for r in res if r["size_bytes"] == size]
    _nice_ticks(ax, "y", min(ys), max(ys), "{:g}x")
    ax.set_xlabel(f"each rank's share of the emulated link, Gbit/s (token bucket / {world})")
    ax.set_ylabel("speed-up over fp32 all-reduce")
    ax.set_title(f"{world} ranks, {_label_size(size)} fp32: measured (auto solid, alltoall "
                 "dashed, allgather dash-dot) and bandwidth model of auto (dotted)", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)


_TRAIN_COLORS = {"fp32": "k", "fp16_hook": "0.55", "powersgd": "tab:orange", "int8": "tab:blue",
                 "int4": "tab:green", "int2": "tab:olive", "sign": "tab:purple", "topk": "tab:red"}


def _train_style(method: str) -> dict:
    """Colour by codec (or baseline), solid with error feedback, dotted without; the
    compressed-momentum optimizer (``gz-opt:``) dash-dotted."""
    if method.startswith("gz-opt:"):
        key = method[len("gz-opt:"):].split(":")[0].split(",")[0].split("+")[0]
        return {"color": _TRAIN_COLORS.get(key, "tab:cyan"), "lw": 1.6, "marker": "x",
                "ms": 3, "ls": "-."}
    key = method[3:].split(":")[0].split(",")[0] if method.startswith("gz:") else method
    if key.startswith("powersgd"):
        key = "powersgd"
    style = {"color": _TRAIN_COLORS.get(key, "tab:cyan"), "lw": 1.2, "marker": ".", "ms": 3,
             "ls": "-" if method.startswith("gz:") else "--"}
    if method == "fp32":
        style.update(lw=2.0, ls="-", marker=None)
    if method.endswith(":noef"):
        style["ls"] = ":"
    return style


def training_plot(doc: dict, png: Path) -> None:
    """Per task: training-set loss vs step and vs wall time, held-out accuracy vs wall time.

    The loss axis starts after the first steps (the initial loss would squash the range
    where the methods differ)."""
    tasks = list(dict.fromkeys(r["task"] for r in doc["runs"]))
    fig, axes = plt.subplots(len(tasks), 3, figsize=(17, 4.8 * len(tasks)), squeeze=False)
    for row, task in zip(axes, tasks):
        runs = [r for r in doc["runs"] if r["task"] == task and r.get("evals")]
        spare = iter(("tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:gray"))
        drawn = set()
        for r in runs:
            ev = r["evals"]
            st = _train_style(r["method"])
            if (st["color"], st["ls"]) in drawn:  # e.g. two gz-opt options of one codec
                st["color"] = next(spare, st["color"])
            drawn.add((st["color"], st["ls"]))
            row[0].plot([e["step"] for e in ev], [e["loss"] for e in ev], label=r["method"], **st)
            row[1].plot([e["wall_s"] for e in ev], [e["loss"] for e in ev], label=r["method"],
                        **st)
            row[2].plot([e["wall_s"] for e in ev], [e["acc"] for e in ev], label=r["method"],
                        **st)
        ref = next((r for r in runs if r["method"] == "fp32"), None)
        if ref is not None:
            ev = ref["evals"]
            lo = min(e["loss"] for r in runs for e in r["evals"])
            hi = next((e["loss"] for e in ev if e["step"] >= ref["steps"] * 0.15), ev[0]["loss"])
            for ax in row[:2]:
                if hi / lo > 5:  # a loss that falls by decades reads best on a log axis
                    ax.set_yscale("log")
                ax.set_ylim(lo * 0.97, max(hi, lo * 1.05))
                ax.axhline(ref["final_loss"], color="k", lw=0.6, ls="--")
            accs = [e["acc"] for r in runs for e in r["evals"] if e["step"] >= ref["steps"] * 0.15]
            if accs:
                row[2].set_ylim(min(accs) - 0.02, max(accs) + 0.01)
        link = doc.get("link", "?")
        row[0].set_title(f"{task}: training-set loss vs step (dashed: fp32's final loss)",
                         fontsize=9)
        row[1].set_title(f"{task}: loss vs wall time of the training steps (link {link})",
                         fontsize=9)
        row[2].set_title(f"{task}: held-out accuracy vs wall time", fontsize=9)
        row[0].set_xlabel("step")
        row[1].set_xlabel("wall time of training steps (s)")
        row[2].set_xlabel("wall time of training steps (s)")
        for ax in row[:2]:
            ax.set_ylabel("loss")
        row[2].set_ylabel("accuracy")
        row[0].legend(fontsize=7, ncol=1 if max(len(r["method"]) for r in runs) > 30 else 2,
                      loc="upper right")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
