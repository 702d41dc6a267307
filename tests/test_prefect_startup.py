"""The temporary Prefect server a flow starts without PREFECT_API_URL gets a start-up timeout
long enough for a busy machine (``pipelines.EPHEMERAL_STARTUP_TIMEOUT``), unless the user set
one."""

import subprocess
import sys

import pytest

from pipelines import EPHEMERAL_STARTUP_TIMEOUT
from tests.helpers import REPO, env

SETTING = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
READ = ("import pipelines; from prefect.settings import get_current_settings; "
        "print(get_current_settings().server.ephemeral.startup_timeout_seconds)")


@pytest.mark.parametrize("given, expected", [(None, EPHEMERAL_STARTUP_TIMEOUT), ("7", 7)])
def test_the_flows_wait_longer_for_the_temporary_server_unless_told(given, expected):
    environ = {k: v for k, v in env().items() if k not in (SETTING, "PREFECT_API_URL")}
    if given is not None:
        environ[SETTING] = given
    out = subprocess.run([sys.executable, "-c", READ], cwd=REPO, env=environ, capture_output=True,
                         text=True, check=True).stdout
    assert int(out) == expected
    assert EPHEMERAL_STARTUP_TIMEOUT > 20  # Prefect's default, too short on a busy machine
