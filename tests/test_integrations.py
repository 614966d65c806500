"""The integrations stay optional: gradzip never imports Lightning or Accelerate, and an
adapter imported without its package says which extra to install. Runs whether or not
the packages are installed (each case hides them from a fresh interpreter)."""

from __future__ import annotations

import subprocess
import sys

import pytest

HIDE = "import sys; sys.modules['lightning'] = sys.modules['pytorch_lightning'] = None; " \
       "sys.modules['accelerate'] = None; "


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], check=False, capture_output=True,
                          text=True, timeout=120)


def test_gradzip_does_not_import_the_frameworks():
    res = _run("import sys, gradzip, gradzip.ddp, gradzip.integrations; "
               "bad = [m for m in ('lightning', 'pytorch_lightning', 'accelerate') "
               "if m in sys.modules]; assert not bad, bad")
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("module,extra", [("lightning", "lightning"),
                                          ("accelerate", "accelerate")])
def test_an_adapter_without_its_package_names_the_extra(module, extra):
    res = _run(HIDE + f"import gradzip.integrations.{module}")
    assert res.returncode != 0
    assert "ImportError" in res.stderr and f"pip install 'gradzip[{extra}]'" in res.stderr, \
        res.stderr
