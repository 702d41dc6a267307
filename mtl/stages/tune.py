"""tune@<variant>: an Optuna study of the variant's search space -> ``tuned/<variant>.json`` (the
chosen params, which train applies, and every trial's params, value and state).

Every variant gets the same budget: ``tune.trials`` trials of at most ``tune.epochs`` epochs, on
the train split, scored on the validation split only, with the first of ``seeds``. The TPE
sampler (Bergstra et al. 2011) is seeded from ``tune.seed``; the median or Hyperband pruner
(Li et al. 2018) stops a trial whose per-epoch validation objective is hopeless. The objective:

- the baseline (``compare.baseline``), when it is ``stl``: one study per task, each task's
  network tuned on its own validation loss (minimised) with ``tune.trials`` trials, which train
  become that member's own settings (``variants.<v>.per_task``). Each network gets as many
  trials as every MTL variant's one network, and the K studies together train about as much
  as one MTL study (each trial trains one of K networks). Another baseline: one study on the
  sum of its tasks' validation losses;
- every other variant: Δm of its validation metrics against the tuned baseline's (maximised),
  so the baseline is tuned first.

The study lives in ``.mtl/tune/<variant>.log`` (an Optuna journal; ``tune.storage`` a database
URL instead), outside DVC outputs: a killed tune resumes and runs only the trials still missing.
``tune.jobs`` processes run trials of one study side by side, each ``study.optimize`` with its
share of them; ``mtl tune --worker W --workers N`` is one such worker (the Prefect ``tune``
flow runs them as tasks)."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import optuna
import torch
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from mtl import paths
from mtl.config import Params, SearchParam
from mtl.engine.trainer import (
    NonFiniteLoss,
    fit,
    predict,
    resolve_precision,
    seed_everything,
    select_device,
    task_losses,
)
from mtl.errors import UserError
from mtl.io import write_json
from mtl.stages import compare, encoded, tuned
from mtl.stages import train as training

DONE = (TrialState.COMPLETE, TrialState.PRUNED)
optuna.logging.set_verbosity(optuna.logging.WARNING)  # a line per trial: the file holds them


def run(params: Params, variant: str, output: Path | None = None) -> None:
    """The stage: the trials still missing (in ``tune.jobs`` processes), then the file
    (``output``, default ``tuned/<variant>.json``)."""
    missing = 0
    for task in subjects(params, variant):
        study = open_study(params, variant, task=task)
        for stale in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if params.tune.storage is None:  # we hold the stage's lock: nobody else runs this journal
                study.tell(stale.number, state=TrialState.FAIL)
        missing = max(missing, params.tune.trials - len(study.get_trials(deepcopy=False, states=DONE)))
    jobs = min(params.tune.jobs, max(missing, 1))
    if jobs == 1:
        work(params, variant, 0, 1)
    else:
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            list(pool.map(partial(work, params, variant, workers=jobs), range(jobs)))
        work(params, variant, 0, 1)  # what a late worker's smaller share left (usually nothing)
    output = output or paths.tuned_path(variant)
    write_json(result(params, variant), output)
    print(f"tune@{variant}: {params.tune.trials} trials ({max(missing, 0)} run now) -> {output}")


def work(params: Params, variant: str, worker: int, workers: int) -> None:
    """Worker ``worker`` of ``workers`` on each of the variant's studies: its share of the trials
    missing when it starts (a late starter sees others' finished trials and takes less, never
    more; the stage runs whatever is still missing)."""
    for task in subjects(params, variant):
        study = open_study(params, variant, worker, task)
        missing = params.tune.trials - len(study.get_trials(deepcopy=False, states=DONE))
        share = max(missing, 0) // workers + (worker < max(missing, 0) % workers)
        if share:
            optimize(params, variant, share, worker, baseline_metrics(params, variant), task)


def optimize(params: Params, variant: str, share: int, worker: int,
             reference: dict | None = None, task: str | None = None) -> None:
    """Run ``share`` trials of the variant's study (of ``task``'s network, for a per-task
    baseline); one worker, others may run beside it."""
    torch.set_num_threads(params.threads(variant))
    study = open_study(params, variant, worker, task)
    stop = optuna.study.MaxTrialsCallback(params.tune.trials, states=DONE)  # several machines
    study.optimize(partial(objective, params=params, variant=variant, reference=reference,
                           data=load_data(params), task=task), n_trials=share, callbacks=[stop])


def subjects(params: Params, variant: str) -> list[str | None]:
    """What the variant's studies tune: each task's network of an ``stl`` baseline, one study
    each; otherwise the whole variant, one study (``None``)."""
    if variant == params.compare.baseline and params.all_variants[variant].arch == "stl":
        return list(params.data.tasks)
    return [None]


def study_name(params: Params, variant: str, task: str | None = None) -> str:
    """The variant (and the task of a per-task study) and a hash of what its trials depend on:
    changed inputs start a new study (more `tune.trials` add trials to the same one)."""
    inputs = {"tune": params.tune.model_dump(exclude={"trials", "jobs", "storage", "space"}),
              "space": {k: v.model_dump() for k, v in params.search_space(variant).items()},
              "variant": params.all_variants[variant].model_dump(), "seed": params.seeds[0],
              "train": params.variant_train(variant).model_dump(),
              "baseline": baseline_metrics(params, variant),
              "delta_m": params.compare.model_dump(include={"delta_m", "exclude"}),
              "data": encoded.data_fingerprint(params), "task": task}
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode())
    return f"{variant}-{'' if task is None else task + '-'}{digest.hexdigest()[:16]}"


def open_study(params: Params, variant: str, worker: int = 0, task: str | None = None) -> optuna.Study:
    """The variant's study, created or loaded. The sampler's seed moves on with the trials
    already run and the worker, so a resumed study or a second worker does not propose the
    first trials again."""
    cfg = params.tune
    name = study_name(params, variant, task)  # first: it names a missing baseline file, writing nothing
    if cfg.storage is None:
        paths.study_path(variant).parent.mkdir(parents=True, exist_ok=True)
        # Absolute: Optuna's lock is a symlink to this path, and the lock a killed run leaves is
        # only released (after 30 s) while the link resolves; a relative one dangles, and waits forever.
        journal = str(paths.study_path(variant).resolve())
        storage = optuna.storages.JournalStorage(JournalFileBackend(journal))
    else:
        storage = optuna.storages.RDBStorage(cfg.storage, heartbeat_interval=60, grace_period=180)
    baseline = variant == params.compare.baseline
    study = optuna.create_study(storage=storage, study_name=name, load_if_exists=True,
                                direction="minimize" if baseline else "maximize")
    epochs = trial_epochs(params, variant)
    study.sampler = optuna.samplers.TPESampler(seed=cfg.seed + len(study.trials) + 10_007 * worker)
    study.pruner = {"median": optuna.pruners.MedianPruner(),
                    "hyperband": optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs),
                    "none": optuna.pruners.NopPruner()}[cfg.pruner]
    return study


def trial_epochs(params: Params, variant: str) -> int:
    return params.tune.epochs or params.variant_train(variant).epochs


def suggest(trial: optuna.Trial, space: dict[str, SearchParam]) -> dict[str, object]:
    """One value per key of ``space``; choices go to Optuna as JSON text (a list is a choice)."""
    values: dict[str, object] = {}
    for key, p in space.items():
        if p.choices is not None:
            values[key] = json.loads(trial.suggest_categorical(key, [json.dumps(c) for c in p.choices]))
        elif p.integer:
            values[key] = trial.suggest_int(key, int(p.low), int(p.high), log=p.log)
        else:
            values[key] = trial.suggest_float(key, p.low, p.high, log=p.log)
    return values


def load_data(params: Params) -> tuple:
    """The preprocessing, tasks and train and val splits (encoded once, shared with train)."""
    schema = encoded.read_inputs(params, ("train", "val"))
    return encoded.load(params, schema, encoded.data_fingerprint(params))


def objective(trial: optuna.Trial, params: Params, variant: str, reference: dict | None,
              data: tuple, task: str | None = None) -> float:
    """Train the trial's params on the train split (``task``'s network alone, for a per-task
    study); its validation objective (``score``), reported after every epoch for the pruner. A
    trial whose loss turns non-finite is pruned."""
    values = suggest(trial, params.search_space(variant))
    chosen = tuned.with_values(params, variant, values, epochs=trial_epochs(params, variant))
    cfg, seed = chosen.variant_train(variant), params.seeds[0]
    preprocessor, tasks, train, val = data
    tasks = [t for t in tasks if task in (None, t.name)]
    seed_everything(seed)
    device = select_device(cfg.device)
    bundle, weighting = training.build(chosen, variant, seed, preprocessor, tasks)
    model, weighting = bundle.model.to(device), weighting.to(device)
    train, val = training.on_device(train, device), val.to(device)

    def report(epoch: int, log: dict[str, float]) -> None:
        trial.report(score(params, from_log(log, tasks), reference), epoch)
        if trial.should_prune():
            raise optuna.TrialPruned(f"pruned at epoch {epoch}")

    options = training.fit_options(cfg, seed, resolve_precision(cfg.precision, device),
                                   progress=False)
    try:
        fit(model, tasks, weighting, train, val, options, on_epoch=report)
    except NonFiniteLoss as exc:  # diverged (a learning rate too high): as hopeless as pruned
        raise optuna.TrialPruned(str(exc)) from None
    metrics = val_metrics(model, tasks, val)
    trial.set_user_attr("val_metrics", metrics)
    return score(params, metrics, reference)


def val_metrics(model: torch.nn.Module, tasks: list, val) -> dict[str, dict[str, float]]:
    """Per task its validation loss and metrics, of the weights ``fit`` kept."""
    outputs = predict(model, val.inputs)
    losses = task_losses(outputs, tasks, val).tolist()
    return {t.name: {"loss": loss} | {k: v if v is None else float(v) for k, v in t.metrics(
        outputs[t.name], val.targets[t.name], val.masks[t.name]).items()}
        for t, loss in zip(tasks, losses)}


def from_log(log: dict[str, float], tasks: list) -> dict[str, dict[str, float]]:
    """An epoch's validation losses and metrics from the trainer's log, as ``val_metrics``."""
    return {t.name: {"loss": log[f"val/loss/{t.name}"]}
            | {key.split("/")[-1]: v for key, v in log.items() if key.startswith(f"val/{t.name}/")}
            for t in tasks}


def score(params: Params, metrics: dict[str, dict[str, float]], reference: dict | None) -> float:
    """The baseline's summed validation loss, or Δm against the baseline's ``reference``."""
    if reference is None:
        return sum(m["loss"] for m in metrics.values())
    used = compare.delta_m_metrics(params, {t: list(m) for t, m in reference.items()})
    value = compare.delta_m(metrics, reference, used)
    return float("nan") if value is None else value  # nan: Optuna marks the trial failed


def baseline_metrics(params: Params, variant: str) -> dict | None:
    """The tuned baseline's validation metrics (``None`` when tuning the baseline itself)."""
    if variant == params.compare.baseline:
        return None
    metrics = tuned.read(params.compare.baseline, paths.TUNED_BASELINE)["val_metrics"]
    if metrics is None:
        raise UserError(f"{paths.TUNED_BASELINE}: the baseline's tuning completed no trial (of "
                        "some task); raise tune.trials or widen tune.space, then re-run it")
    return metrics


def result(params: Params, variant: str) -> dict:
    """The file: ``study_result`` of the variant's one study; of a per-task baseline, each
    task's under ``studies``, their params as ``per_task`` (which train applies), their
    validation metrics together and the sum of their best losses as ``value``."""
    tasks = subjects(params, variant)
    if tasks == [None]:
        return study_result(params, variant, open_study(params, variant))
    studies = {task: study_result(params, variant, open_study(params, variant, task=task))
               for task in tasks}
    metrics = [study["val_metrics"] for study in studies.values()]
    values = [study["value"] for study in studies.values()]
    return {"variant": variant, "tuned": True, "objective": "each task's validation loss",
            "direction": "minimize", "budget": studies[tasks[0]]["budget"], "params": {},
            "value": None if None in values else sum(values),  # the tasks' summed loss
            "per_task": {task: study["params"] for task, study in studies.items()},
            "val_metrics": None if None in metrics else {k: v for m in metrics for k, v in m.items()},
            "studies": studies}


def study_result(params: Params, variant: str, study: optuna.Study) -> dict:
    """One study: the best trial's params and validation metrics, the budget, every trial, and
    the parameters' importances (Optuna's fANOVA) where enough trials completed."""
    trials = study.get_trials(deepcopy=False)
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    best = study.best_trial if done else None
    space = params.search_space(variant)
    return {"variant": variant, "tuned": True, "study": study.study_name,
            "objective": objective_name(params, variant),
            "direction": study.direction.name.lower(),
            "budget": {"trials": params.tune.trials, "epochs": trial_epochs(params, variant),
                       "pruner": params.tune.pruner},
            "params": decode(best.params, space) if best else {},
            "value": best.value if best else None,
            "val_metrics": best.user_attrs["val_metrics"] if best else None,
            "importances": importances(study, len(done)),
            "trials": [{"number": t.number, "state": t.state.name.lower(), "value": t.value,
                        "params": decode(t.params, space)} for t in trials]}


def objective_name(params: Params, variant: str) -> str:
    if variant != params.compare.baseline:
        return f"validation Δm % against {params.compare.baseline}"
    return "validation loss" if subjects(params, variant) != [None] else "summed validation loss"


def decode(values: dict[str, object], space: dict[str, SearchParam]) -> dict[str, object]:
    return {k: json.loads(v) if space[k].choices is not None else v for k, v in values.items()}


def importances(study: optuna.Study, complete: int) -> dict[str, float] | str:
    """Optuna's parameter importances, or why there are none."""
    if complete < 3:
        return f"only {complete} complete trial(s): too few to estimate importances"
    try:
        return {k: float(v) for k, v in optuna.importance.get_param_importances(study).items()}
    except (RuntimeError, ValueError) as exc:
        return f"not estimated ({exc})"
