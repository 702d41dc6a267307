"""Shared test helpers: where the repository is, and how to run the real CLI and DVC."""

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the virtualenv's bin: mtl and dvc live here


def env() -> dict[str, str]:
    """The environment stage commands run in: our venv first on PATH, telemetry off."""
    return os.environ | {"PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                         "DVC_NO_ANALYTICS": "1", "DO_NOT_TRACK": "1", "CI": "true",
                         "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


def run(args: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=cwd, env=env(), capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def arch_options(arch: str, tasks: list) -> dict | None:
    """What an architecture needs beyond its defaults: for ``groups``, two groups (every task
    but the last, and the last alone), so that both of its kinds of network run."""
    names = [t.name for t in tasks]
    return {"groups": [names[:-1], names[-1:]]} if arch == "groups" else None


def train_project(root: Path, raw: dict, variant: str) -> Path:
    """``root`` with ``raw`` as its params.yaml, its data stages run and ``variant`` trained on
    seed 0, in this process."""
    import pytest
    import yaml

    from mtl.config import load_params
    from mtl.stages import augment, ingest, split, train

    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        params = load_params()
        for stage in (ingest, augment, split):
            stage.run(params)
        train.run(params, variant, 0, resume=False)
    return root
