"""The CLI's helpers. Its handling of mistakes (exit code 2, one line ``error: ...``, nothing
written) is tested case by case in ``tests/test_bad_inputs.py``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ENV = {**os.environ, "DVC_NO_ANALYTICS": "1", "DO_NOT_TRACK": "1"}


def mtl(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mtl", *args], cwd=cwd, env=ENV, check=False,
                          capture_output=True, text=True, timeout=120)


def test_methods_json(tmp_path: Path) -> None:
    result = mtl(tmp_path, "methods", "--json")
    assert result.returncode == 0, result.stderr
    listing = json.loads(result.stdout)
    assert {"architectures", "weightings"} <= set(listing)
    assert {"hps", "stl"} <= set(listing["architectures"])
    assert {"ew", "static"} <= set(listing["weightings"])
