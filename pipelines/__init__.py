"""Prefect flows over the pipeline's stages (manual runs, scheduled deployments, sweeps).

Without ``PREFECT_API_URL`` a flow run starts Prefect's temporary server, which waits 20 s for
it by default: on a busy machine its start-up (imports, database migrations) takes longer and
the flow failed. Here it may take ``EPHEMERAL_STARTUP_TIMEOUT`` seconds. With ``PREFECT_API_URL``
set, the flows use that running server and start none. Both are environment defaults, set
before Prefect is imported: a value the user set wins."""

import os

EPHEMERAL_STARTUP_TIMEOUT = 180  # seconds

# No internet: telemetry off unless the user decided otherwise (see ../shared/DESIGN.md).
for _name, _value in (("DO_NOT_TRACK", "1"), ("DVC_NO_ANALYTICS", "1"),
                      ("PREFECT_SERVER_ANALYTICS_ENABLED", "false"),
                      ("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS",
                       str(EPHEMERAL_STARTUP_TIMEOUT))):
    os.environ.setdefault(_name, _value)
