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
