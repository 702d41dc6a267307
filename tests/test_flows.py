"""Prefect flows against a real Prefect server on loopback: the scheduled deployment run by a real
process worker, skipping up-to-date stages, retries, a sweep, and the Dask task runner."""

import asyncio
import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL, temporary_settings

from pipelines.flows import pipeline, sweep
from tests.helpers import env, run
from tests.test_pipeline_dvc import FAST, commit, copy_project, edit_params

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real `prefect server start` on 127.0.0.1 with its own SQLite database."""
    home = tmp_path_factory.mktemp("prefect-home")
    url = f"http://127.0.0.1:{free_port()}/api"
    server_env = env() | {"PREFECT_HOME": str(home), "PREFECT_API_URL": url}
    port = url.split(":")[-1].split("/")[0]
    process = subprocess.Popen(["prefect", "server", "start", "--host", "127.0.0.1", "--port", port],
                               env=server_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    try:
        subprocess.run(["prefect", "server", "status", "--wait", "--timeout", "180"], env=server_env,
                       check=True, capture_output=True)
        with temporary_settings({PREFECT_API_URL: url}):
            yield server_env
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = copy_project(tmp_path_factory.mktemp("flow-project"))
    edit_params(root, lambda p: (p["train"].update(FAST), p.update(seeds=[0])))
    commit(root, "fast training for tests")
    return root


def prefect(server_env: dict, root: Path, *args: str) -> str:
    result = subprocess.run(["prefect", "--no-prompt", *args], cwd=root, env=server_env,
                            capture_output=True, text=True, check=False, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


async def deployment_and_last_run(name: str):
    async with get_client() as client:
        deployment = await client.read_deployment_by_name(name)
        runs = await client.read_flow_runs()
        runs = [r for r in runs if r.deployment_id == deployment.id]
        return deployment, runs


def test_scheduled_deployment_runs_on_a_worker_and_leaves_dvc_clean(server, project):
    prefect(server, project, "work-pool", "create", "mtl-process", "--type", "process")
    prefect(server, project, "deploy", "--prefect-file", "pipelines/prefect.yaml", "--all")
    deployment, _ = asyncio.run(deployment_and_last_run("pipeline/nightly"))
    assert [s.schedule.cron for s in deployment.schedules] == ["0 2 * * *"]
    assert deployment.work_pool_name == "mtl-process"

    prefect(server, project, "deployment", "run", "pipeline/nightly")
    prefect(server, project, "worker", "start", "--pool", "mtl-process", "--run-once")
    _, runs = asyncio.run(deployment_and_last_run("pipeline/nightly"))
    manual = [r for r in runs if r.state.is_completed()]
    assert manual, [r.state for r in runs]
    assert "up to date" in run(["dvc", "status"], project).stdout
    assert "Running stage" not in run(["dvc", "repro"], project).stdout


def test_a_second_run_with_nothing_changed_trains_nothing(server, project):
    pipeline(root=str(project))  # up to date after this, whatever ran before
    assert pipeline(root=str(project)) == []


def test_overrides_run_only_the_changed_variant_and_are_recorded(server, project):
    params_yaml = project / "params.yaml"
    params_yaml.write_text("# a user's note\n" + params_yaml.read_text())
    ran = pipeline(root=str(project), overrides=["variants.hps-static.weights.body_mass=3.0"])
    assert ran == ["train@hps-static-0", "evaluate@hps-static-0", "compare", "report"]
    params = yaml.safe_load(params_yaml.read_text())
    assert params["variants"]["hps-static"]["weights"]["body_mass"] == 3.0
    assert params_yaml.read_text().startswith("# a user's note\n")  # comments are kept
    assert "up to date" in run(["dvc", "status"], project).stdout


def test_a_stage_that_fails_once_is_retried(server, project):
    dvc_yaml = project / "dvc.yaml"
    original = dvc_yaml.read_text()
    flaky = "sh -c 'test -e .failed-once || { touch .failed-once; echo boom >&2; exit 3; }; mtl compare'"
    dvc_yaml.write_text(original.replace("    cmd: mtl compare", f'    cmd: "{flaky}"'))
    try:
        # compare reruns (its cmd changed) and writes the same results, so report stays up to date
        assert pipeline(root=str(project), retries=1) == ["compare"]
        assert (project / ".failed-once").exists()
        assert "up to date" in run(["dvc", "status"], project).stdout
    finally:
        dvc_yaml.write_text(original)


def test_a_failure_names_the_stage_and_its_cause(server, project):
    dvc_yaml = project / "dvc.yaml"
    original = dvc_yaml.read_text()
    dvc_yaml.write_text(original.replace("    cmd: mtl compare", "    cmd: mtl compare --set compare.baseline=nope"))
    try:
        with pytest.raises(RuntimeError, match=r"stage compare failed \(exit 2\): error: .*compare.baseline"):
            pipeline(root=str(project), retries=0)
    finally:
        dvc_yaml.write_text(original)
    assert pipeline(root=str(project)) == ["compare"]


def test_sweep_over_architectures_and_seeds_in_parallel(server, project):
    result = sweep(root=str(project), archs=["mmoe"], weightings=["ew", "uw"], seeds=[0, 1],
                   runner="processes")
    assert sorted(result) == ["sweep-mmoe-ew", "sweep-mmoe-uw"]
    for delta in result.values():
        assert len(delta["per_seed"]) == 2 and delta["per_seed"][0] != delta["per_seed"][1]
    assert yaml.safe_load((project / "params.yaml").read_text())["seeds"] == [0, 1]
    assert (project / "metrics/variants/stl/seed-1.json").is_file()  # the baseline on the new seed
    assert "up to date" in run(["dvc", "status"], project).stdout


def test_dask_runner_on_an_existing_cluster(server, project):
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=2, processes=True, host="127.0.0.1",
                      dashboard_address=":0") as cluster:
        ran = pipeline(root=str(project), overrides=["variants.hps-ew.train.lr=0.01"],
                       runner="dask", dask_address=cluster.scheduler_address)
    assert set(ran) == {"train@hps-ew-0", "train@hps-ew-1", "evaluate@hps-ew-0", "evaluate@hps-ew-1",
                        "compare", "report"}
