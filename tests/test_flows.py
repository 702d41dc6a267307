"""Prefect flows against a real Prefect server on loopback, over real DVC and real training.

Each test works on its own copy of a project that the flow brought up to date once (``template``),
DVC cache and run-cache included, so that every test passes alone and in any order. The tests of
deployments start their own server and worker with ``pipelines/serve.sh``."""

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from uuid import UUID

import httpx
import psutil
import pytest
import yaml
from prefect import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter
from prefect.logging.handlers import APILogWorker
from prefect.settings import PREFECT_API_URL, temporary_settings

from mtl.errors import UserError
from pipelines.flows import pipeline, tune
from pipelines.stage import StageStopped
from tests.helpers import env, free_port, run
from tests.test_pipeline_dvc import FAST, commit, copy_project, edit_params, repro
from tests.test_serve import MODEL, serving

pytestmark = pytest.mark.slow
STAGES = {"check", "ingest", "augment", "split", "reference", "compare", "report", "tune-baseline",
          *(f"tune@{v}" for v in ("stl", "hps-ew", "hps-static")),
          *(f"{s}@{v}{seed}" for s, seed in (("train", "-0"), ("evaluate", "")) for v in ("stl", "hps-ew", "hps-static"))}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real `prefect server start` on 127.0.0.1 with its own SQLite database."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    server_env = env() | {"PREFECT_HOME": str(home), "PREFECT_API_URL": url}
    process = subprocess.Popen(["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                               env=server_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    try:
        subprocess.run(["prefect", "server", "status", "--wait", "--timeout", "180"], env=server_env,
                       check=True, capture_output=True)
        with temporary_settings({PREFECT_API_URL: url}), pytest.MonkeyPatch.context() as patch:
            patch.setenv("PREFECT_API_URL", url)  # for the processes of the process task runner
            yield server_env
            APILogWorker.drain_all(timeout=5)  # the last logs reach the server before it stops
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def template(server, tmp_path_factory):
    """A fresh project (fast training, one seed) that the flow brought up to date, and the stages
    that flow ran. Tests use copies of it (``project``), never the template itself."""
    root = copy_project(tmp_path_factory.mktemp("template"))
    edit_params(root, lambda p: (p["train"].update(FAST), p.update(seeds=[0])))
    commit(root, "fast training for tests")
    return root, pipeline(root=str(root))


@pytest.fixture
def project(template, tmp_path):
    """A copy of the up-to-date template for one test: outputs, dvc.lock and DVC's cache."""
    return Path(shutil.copytree(template[0], tmp_path / "project", symlinks=True))


def flow_run(flow, **parameters):
    """Call a flow; its result (or exception) and the id of its flow run."""
    state = flow(**parameters, return_state=True)
    return state.result(raise_on_failure=False), state.state_details.flow_run_id


def task_runs(flow_run_id: UUID) -> dict:
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {r.name: r for r in runs}


def edit_stage(root: Path, stage: str, cmd: str) -> None:
    """Replace a stage's command in the project's dvc.yaml."""
    dvc_yaml = yaml.safe_load((root / "dvc.yaml").read_text())
    dvc_yaml["stages"][stage]["cmd"] = cmd
    (root / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml, sort_keys=False))


def is_clean(root: Path) -> bool:
    return "up to date" in run(["dvc", "status"], root).stdout


def test_a_fresh_project_runs_every_stage_and_dvc_repro_has_nothing_left(template):
    root, ran = template
    assert set(ran) == STAGES and len(ran) == len(STAGES)
    assert ran.index("train@hps-ew-0") < ran.index("evaluate@hps-ew") < ran.index("compare")
    assert is_clean(root)
    assert "Running stage" not in run(["dvc", "repro", "--dry"], root).stdout


def test_nothing_changed_runs_nothing(project):
    ran, flow_run_id = flow_run(pipeline, root=str(project))
    assert ran == [] and task_runs(flow_run_id) == {}


def test_each_stage_starts_when_its_own_inputs_are_ready(project):
    """No level barrier: evaluate@hps-ew starts while train@hps-static-0 (100 epochs, not 4)
    trains. Only the changed variants run; the overrides are recorded, comments kept."""
    (project / "params.yaml").write_text("# a user's note\n" + (project / "params.yaml").read_text())
    ran, flow_run_id = flow_run(pipeline, root=str(project), overrides=[
        "variants.hps-ew.train.lr=0.01", "variants.hps-static.train.epochs=100"])
    assert set(ran) == {"check", "tune@hps-ew", "tune@hps-static", "train@hps-ew-0",
                        "train@hps-static-0", "evaluate@hps-ew",
                        "evaluate@hps-static", "compare", "report"}
    runs = task_runs(flow_run_id)
    assert runs["evaluate@hps-ew"].start_time < runs["train@hps-static-0"].end_time
    assert runs["train@hps-static-0"].end_time < runs["evaluate@hps-static"].start_time
    assert runs["evaluate@hps-static"].end_time < runs["compare"].start_time
    params = yaml.safe_load((project / "params.yaml").read_text())
    assert params["variants"]["hps-ew"]["train"] == {"lr": 0.01}
    assert (project / "params.yaml").read_text().startswith("# a user's note\n")
    assert is_clean(project)


def test_a_run_with_the_same_inputs_is_restored_from_the_run_cache_shared_with_dvc_repro(project):
    metrics = project / "metrics/variants/hps-ew/seed-0.json"
    original_params, original_metrics = (project / "params.yaml").read_text(), metrics.read_bytes()
    edit_params(project, lambda p: p["variants"]["hps-ew"].update(train={"lr": 0.01}))
    assert "train@hps-ew-0" in repro(project)  # dvc repro runs it and saves it to the run-cache
    changed_metrics = metrics.read_bytes()
    assert changed_metrics != original_metrics

    (project / "params.yaml").write_text(original_params)  # reverted: the flow's first run is reused
    ran, flow_run_id = flow_run(pipeline, root=str(project))
    assert ran == ["check"] and set(task_runs(flow_run_id)) == {"check"}  # check has no run-cache
    assert metrics.read_bytes() == original_metrics and is_clean(project)

    ran, _ = flow_run(pipeline, root=str(project), overrides=["variants.hps-ew.train.lr=0.01"])
    assert ran == ["check"]  # dvc repro's run is reused
    assert metrics.read_bytes() == changed_metrics and is_clean(project)


def test_output_reaches_the_log_as_it_is_printed_and_a_failure_names_stage_and_cause(
        project, monkeypatch):
    monkeypatch.delenv("PYTHONUNBUFFERED", raising=False)  # the flow sets it for the stage
    printer = "import time; print('first line'); time.sleep(3); print('second line')"
    edit_stage(project, "compare", f'python -c "{printer}" && mtl compare --set compare.baseline=nope')
    error, flow_run_id = flow_run(pipeline, root=str(project), retries=0)
    assert isinstance(error, RuntimeError)
    assert str(error).startswith("stage compare failed (exit 2): error: ")
    assert "compare.baseline" in str(error)
    with get_client(sync_client=True) as client:
        for _ in range(50):  # the logs reach the server in batches
            logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
            printed = {log.message.split(" | ")[-1]: log.timestamp for log in logs if " | " in log.message}
            if {"first line", "second line"} <= set(printed):
                break
            time.sleep(0.2)
    assert (printed["second line"] - printed["first line"]).total_seconds() > 2

    edit_stage(project, "compare", "mtl compare")  # as before: restored from the run-cache
    assert pipeline(root=str(project)) == [] and is_clean(project)


def test_a_stage_that_fails_once_is_retried(project):
    flaky = "test -e .failed-once || { touch .failed-once; echo boom >&2; exit 3; }; mtl compare"
    edit_stage(project, "compare", f"sh -c '{flaky}'")
    # compare reruns (its cmd changed) and writes the same results, so report stays up to date
    assert pipeline(root=str(project), retries=1) == ["compare"]
    assert (project / ".failed-once").exists()
    assert is_clean(project)


def test_a_stage_stopped_by_a_signal_is_not_retried(project):
    edit_stage(project, "compare", "echo attempt >> attempts.txt; kill -TERM $$")
    with pytest.raises(StageStopped, match="stage compare stopped by signal 15"):
        pipeline(root=str(project), retries=2)
    assert (project / "attempts.txt").read_text() == "attempt\n"


def test_an_empty_dvc_lock_is_replaced_by_the_last_good_copy(project):
    (project / "dvc.lock").write_text("")  # as a kill while DVC rewrites it leaves it
    assert pipeline(root=str(project)) == []  # report, committed after the copy, is restored
    assert is_clean(project)

    (project / "dvc.lock").write_text("schema: '2.0'\nstages:\n  ingest: {cmd: mtl ingest, outs: [")
    (project / ".mtl/dvc.lock.good").unlink()
    with pytest.raises(UserError, match=r"dvc.lock: unreadable \(.*\) and no good copy"):
        pipeline(root=str(project))


def test_a_sweep_leaves_the_project_alone_and_reuses_its_runs(project, server):
    params, lock = (project / "params.yaml").read_bytes(), (project / "dvc.lock").read_bytes()
    # In a process of its own with PREFECT_API_URL set, as users run it: the process task runner's
    # processes report through a thread that does not see this test's temporary settings.
    script = ("import json, sys; from pipelines.flows import sweep; state = sweep(root=sys.argv[1], "
              "archs=['mmoe'], weightings=['ew', 'uw'], runner='processes', return_state=True); "
              "print(json.dumps([str(state.state_details.flow_run_id), state.result()]))")
    out = subprocess.run([sys.executable, "-c", script, str(project)], env=server, check=True,
                         capture_output=True, text=True).stdout
    flow_run_id, result = json.loads(out.splitlines()[-1])
    assert sorted(result) == ["sweep-mmoe-ew", "sweep-mmoe-uw"]
    assert all(delta["mean"] is not None for delta in result.values())
    # ingest, split and the baseline are restored from the project's run-cache, not run again
    assert set(task_runs(UUID(flow_run_id))) == {"check", "compare", "report", "tune@sweep-mmoe-ew",
                                                 "tune@sweep-mmoe-uw", *(
        f"{s}@sweep-mmoe-{w}{seed}" for s, seed in (("train", "-0"), ("evaluate", "")) for w in ("ew", "uw"))}
    assert "sweep-mmoe-uw" in (project / ".mtl/sweeps/sweep/reports/compare.md").read_text()
    assert (project / "params.yaml").read_bytes() == params
    assert (project / "dvc.lock").read_bytes() == lock
    assert is_clean(project)


def test_dask_runner_on_an_existing_cluster(project):
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=2, processes=True, host="127.0.0.1",
                      dashboard_address=":0") as cluster:
        ran = pipeline(root=str(project), overrides=["variants.hps-ew.train.lr=0.01"],
                       runner="dask", dask_address=cluster.scheduler_address)
    assert ran == ["check", "tune@hps-ew", "train@hps-ew-0", "evaluate@hps-ew", "compare", "report"]


def test_serve_variant_releases_the_retrained_model_to_a_running_server(project):
    """The flow retrains hps-ew and releases it; the running ``mtl serve`` loads it without a
    restart (it watches the release), and a variant that does not exist fails before any stage."""
    with pytest.raises(UserError, match="serve_variant: 'nope'"):
        pipeline(root=str(project), serve_variant="nope")
    with serving(project) as (url, _):
        before = httpx.get(f"{url}/ready").json()["model_sha256"]
        ran = pipeline(root=str(project), overrides=["variants.hps-ew.train.lr=0.01"],
                       serve_variant="hps-ew")
        assert "train@hps-ew-0" in ran
        after = hashlib.sha256((project / MODEL).read_bytes()).hexdigest()
        assert after != before
        wait_for(lambda: httpx.get(f"{url}/ready").json()["model_sha256"] == after, 15,
                 "the server to load the released model")


# Deployments on a server and worker that pipelines/serve.sh starts (as `make serve` does).

@contextlib.contextmanager
def served(root: Path, home: Path):
    """``pipelines/serve.sh`` in ``root`` with its own PREFECT_HOME and port; ``serve.sh stop`` at
    the end. Yields the environment of its API, and the client settings point at it."""
    serve_env = {k: v for k, v in env().items() if k != "PREFECT_API_URL"}
    serve_env |= {"PREFECT_HOME": str(home), "PREFECT_PORT": str(free_port())}
    try:
        subprocess.run(["pipelines/serve.sh"], cwd=root, env=serve_env, check=True,
                       capture_output=True, text=True, timeout=300)
        url = f"http://127.0.0.1:{serve_env['PREFECT_PORT']}/api"
        with temporary_settings({PREFECT_API_URL: url}):
            yield serve_env | {"PREFECT_API_URL": url}
    finally:
        subprocess.run(["pipelines/serve.sh", "stop"], cwd=root, env=serve_env, timeout=120,
                       check=False)


def deployment_run(root: Path, serve_env: dict, name: str, *args: str) -> UUID:
    out = subprocess.run(["prefect", "--no-prompt", "deployment", "run", name, *args], cwd=root,
                         env=serve_env, capture_output=True, text=True, check=True).stdout
    return UUID(out.split("UUID:")[1].split()[0])


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(1)
    return result


def read_flow_run(flow_run_id: UUID):
    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id)


def started_by(home: Path) -> list[psutil.Process]:
    """The live processes whose PREFECT_HOME is ``home``: serve.sh and everything it started."""
    found = []
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if (process.status() != psutil.STATUS_ZOMBIE
                    and process.environ().get("PREFECT_HOME") == str(home)):
                found.append(process)
    return found


def a_stage_runs(home: Path) -> bool:
    """Whether a stage command started under ``home`` runs (its shell: /bin/sh -c "mtl ...")."""
    for process in started_by(home):
        with contextlib.suppress(psutil.Error):
            if any(arg.startswith("mtl ") for arg in process.cmdline()):
                return True
    return False


def test_the_deployments_of_one_project_queue_instead_of_running_at_once(project, tmp_path):
    with served(project, tmp_path / "home") as serve_env:
        with get_client(sync_client=True) as client:
            nightly = client.read_deployment_by_name("pipeline/nightly")
        assert [s.schedule.cron for s in nightly.schedules] == ["0 2 * * *"]
        assert nightly.work_pool_name == "mtl-process"
        runs = [deployment_run(project, serve_env, "pipeline/nightly", "--param",
                               'overrides=["variants.hps-ew.train.lr=0.01"]'),
                deployment_run(project, serve_env, "sweep/sweep")]

        def ended():
            states = [read_flow_run(r).state for r in runs]
            return all(s.is_final() for s in states) and states

        states = wait_for(ended, 400, "both runs to end")
        assert all(s.is_completed() for s in states), states
        first, second = sorted((task_runs(r) for r in runs),
                               key=lambda ts: min(t.start_time for t in ts.values()))
        assert max(t.end_time for t in first.values()) < min(t.start_time for t in second.values())
    assert is_clean(project)
    assert "sweep-hps-ew" not in (project / "params.yaml").read_text()


def test_a_run_whose_worker_and_process_die_ends_crashed(tmp_path):
    """A host crash, simulated: SIGKILL for the worker and the flow run's processes at once."""
    root = copy_project(tmp_path / "project")
    automation = root / "pipelines/automations.yaml"  # the shortest window above the 30 s heartbeat
    automation.write_text(automation.read_text().replace("within: 90", "within: 40"))
    with served(root, tmp_path / "home") as serve_env:
        flow_run_id = deployment_run(root, serve_env, "pipeline/nightly")
        with get_client(sync_client=True) as client:
            wait_for(lambda: client.read_events(EventFilter(
                event=EventNameFilter(name=["prefect.flow-run.heartbeat"]),
                resource=EventResourceFilter(id=[f"prefect.flow-run.{flow_run_id}"])), limit=1).events,
                120, "the run's first heartbeat")
        worker = psutil.Process(int((tmp_path / "home/run/worker.pid").read_text()))
        doomed = [worker, *worker.children(recursive=True)]
        assert any("prefect.engine" in " ".join(p.cmdline()) for p in doomed)
        for process in doomed:
            process.kill()
        killed = time.monotonic()
        state = wait_for(lambda: (s := read_flow_run(flow_run_id).state).is_final() and s, 120,
                         "the run to end")
        assert state.is_crashed(), state
        assert time.monotonic() - killed < 40 + 30  # the window, plus Prefect's evaluation


def test_make_stop_leaves_nothing_that_make_serve_started(tmp_path):
    root, home = copy_project(tmp_path / "project"), tmp_path / "home"
    with served(root, home) as serve_env:
        deployment_run(root, serve_env, "pipeline/nightly")
        wait_for(lambda: a_stage_runs(home), 120, "a stage of the run to start")
        started = time.monotonic()
        # A narrow terminal (CI's COLUMNS=80 cut a long venv path) must not hide the command.
        out = subprocess.run(["pipelines/serve.sh", "stop"], cwd=root,
                             env=serve_env | {"COLUMNS": "40"},
                             capture_output=True, text=True, check=True, timeout=120)
        assert out.stdout.splitlines() == ["stopped worker", "stopped server"], out.stderr
        assert time.monotonic() - started < 30
        assert started_by(home) == []


def test_the_tune_flow_fans_each_studys_trials_out_as_tasks(project):
    """The baseline's study first, then the others'; two worker tasks per study run the
    requested trials between them, and each variant's file is written."""
    edit_params(project, lambda p: p.update(tune=p["tune"] | {"trials": 3, "epochs": 1}))
    result, flow_run_id = flow_run(tune, root=str(project), shares=2)
    assert set(result) == {"stl", "hps-ew", "hps-static"}
    for variant in result:
        chosen = json.loads((project / "tuned" / f"{variant}.json").read_text())
        for study in chosen.get("studies", {"": chosen}).values():  # stl: one study per task
            assert [t["state"] for t in study["trials"]] == ["complete"] * 3
    assert len(json.loads((project / "tuned" / "stl.json").read_text())["studies"]) == 3
    runs = task_runs(flow_run_id)
    assert {f"tune@{v}-{w}" for v in result for w in (0, 1)} <= set(runs)
    assert runs["tune-baseline"].end_time < runs["tune@hps-ew-0"].start_time  # the baseline first
