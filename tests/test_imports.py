"""timm and torchvision are imported only when the model needs them (import time is most of a short
command's wall time). Each check runs the command line in a fresh interpreter and lists the heavy
packages it ended up importing."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import DATA, ROOT

pytestmark = pytest.mark.slow  # each check starts an interpreter and imports torch: 20-35 s on 2 busy cores

# Runs the CLI like `python -m resprobe ...`, then prints which of these packages were imported.
PROBE = """
import json, sys
from resprobe.cli import main
sys.argv = ["resprobe", *sys.argv[1:]]
try:
    main()
except SystemExit as exc:
    code = exc.code
else:
    code = 0
print(json.dumps({"code": code, "imported": sorted(m for m in ("timm", "torchvision", "transformers")
                                                   if m in sys.modules)}),
      file=sys.stderr)
"""


def imported_by(*args: object) -> list[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", PROBE, *map(str, args)], cwd=ROOT, capture_output=True,
                            text=True, timeout=300, env=env)
    verdict = json.loads(result.stderr.strip().splitlines()[-1])
    assert verdict["code"] in (0, None), result.stderr
    return verdict["imported"]


def test_align_of_a_recording_imports_neither_timm_nor_torchvision(fixture_run, tmp_path):
    out, _ = fixture_run
    assert imported_by("align", out, "-f", "json", "-q") == []
    assert imported_by("plot", out, "--out", tmp_path / "a.png", "-f", "json", "-q") == []


def test_a_torchvision_model_on_arrays_does_not_import_timm():
    # Also shows that the probe sees imports: torchvision is there.
    assert imported_by("eval", "torchvision:resnet18", "--num-classes", "4", "--data", DATA, "--limit", "8",
                       "--device", "cpu", "-f", "json", "-q") == ["torchvision"]


def test_import_resprobe_and_a_vision_blocks_listing_import_no_transformers():
    code = ("import sys, resprobe, resprobe.cli, resprobe.record, resprobe.align, resprobe.models.causal_lm; "
            "print('transformers' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.stdout.strip() == "False", result.stderr
    assert "transformers" not in imported_by("blocks", "torchvision:resnet18", "--num-classes", "4", "-f", "json", "-q")


PACKAGE_ONLY = """
import json, sys
import resprobe as rp
light = "torch" not in sys.modules
api_names = [n for n in ("align", "ablate", "blocks", "evaluate", "share", "finetune", "record", "open_recording",
                         "save", "load") if n in dir(rp)]
import resprobe.align  # the module of the same name must not shadow the function
print(json.dumps({"light": light, "names": api_names, "function": callable(rp.align) and rp.align.__module__}))
"""


def test_import_resprobe_stays_light_and_rp_align_is_the_function():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", PACKAGE_ONLY], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, env=env)
    verdict = json.loads(result.stdout.strip().splitlines()[-1])
    assert verdict["light"], "import resprobe imported torch"
    assert len(verdict["names"]) == 10
    assert verdict["function"] == "resprobe.api"
