"""The environment in which the tests start benchmark scripts as child processes."""

from __future__ import annotations

import glob
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"


def bench_env() -> dict[str, str]:
    """This environment with bench/ importable, and the source tree's gradzip only where it
    has an in-place build (the rule of bench/harness.py): after a plain ``pip install .``
    (CI) the source tree has no compiled ``_C`` and must not shadow the installed
    package."""
    env = dict(os.environ)
    paths = [str(BENCH)]
    if glob.glob(str(ROOT / "python" / "gradzip" / "_C*.so")):
        paths.insert(0, str(ROOT / "python"))
    env["PYTHONPATH"] = os.pathsep.join([*paths, env.get("PYTHONPATH", "")])
    return env
