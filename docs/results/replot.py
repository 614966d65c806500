"""Redraw the figures in docs/img from the JSON in docs/results, as the code behaves now.

After these runs `algorithm="auto"` stopped re-compressing 1-bit sign in two phases
(docs/results.md, section 3). The JSON keep every sample as measured; the figures show
what the current code does:

* all-reduce figures: the rows measured as ``gz:sign:auto`` are left out (they were the
  two-phase algorithm, which is still there as ``gz:sign:alltoall``); ``auto`` for sign is
  now the all-gather, the ``gz:sign:allgather`` rows;
* training figures: the ``gz:sign`` and ``gz:sign:noef`` runs come from the re-runs with
  one compression per rank (``train_sign_1gbit.json``, ``train_digits600_sign_1gbit.json``:
  the same tasks, seeds, schedule, link and arguments but ``--methods``), the other runs
  from the original files.

    python docs/results/replot.py      # needs matplotlib; draws with bench/plots.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import plots  # bench/plots.py

RESULTS, IMG = ROOT / "docs" / "results", ROOT / "docs" / "img"
STALE = {"gz:sign:auto"}


def _load(name: str) -> dict:
    return json.loads((RESULTS / f"{name}.json").read_text())


def allreduce(name: str) -> None:
    doc = _load(name)
    doc["results"] = [r for r in doc["results"] if r.get("method") not in STALE]
    plots.allreduce_plot(doc, IMG / f"{name}.png")


def training(name: str, sign_rerun: str) -> None:
    doc, rerun = _load(name), _load(sign_rerun)
    same = {k: v for k, v in doc["config"].items() if k not in ("methods", "out", "plot")}
    again = {k: v for k, v in rerun["config"].items() if k not in ("methods", "out", "plot")}
    if same != again:
        raise SystemExit(f"{sign_rerun} was not run like {name}: {same} != {again}")
    sign = [r for r in rerun["runs"] if r["method"].startswith("gz:sign")]
    doc["runs"] = [r for r in doc["runs"] if not r["method"].startswith("gz:sign")] + sign
    plots.training_plot(doc, IMG / f"{name}.png")


if __name__ == "__main__":
    allreduce("allreduce_headline")
    allreduce("allreduce_crossover")
    training("train_1gbit", "train_sign_1gbit")
    training("train_digits600_1gbit", "train_digits600_sign_1gbit")
    print(f"redrew 4 figures in {IMG}")
