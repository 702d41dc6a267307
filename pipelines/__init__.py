"""Prefect flows over the pipeline's stages (manual runs, scheduled deployments, sweeps)."""

import os

# No internet: telemetry off unless the user decided otherwise (see ../shared/DESIGN.md).
for _name, _value in (("DO_NOT_TRACK", "1"), ("DVC_NO_ANALYTICS", "1"),
                      ("PREFECT_SERVER_ANALYTICS_ENABLED", "false")):
    os.environ.setdefault(_name, _value)
