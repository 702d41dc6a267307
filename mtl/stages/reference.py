"""reference: one gradient-boosted tree model per task (per label for multilabel), the strong
single-task reference for tables -> ``metrics/reference.json``, in the format of one run's
``evaluate`` output, scored by the same code (``mtl.stages.evaluate.score_outputs``).

``compare.reference`` picks LightGBM (Ke et al. 2017, "LightGBM: A Highly Efficient Gradient
Boosting Decision Tree") or scikit-learn's HistGradientBoosting, which grows trees the same way.
Each model trains on the train split, rows whose label is missing dropped (each label on its
own), augmented copies included as the networks see them; it is early-stopped on the val split's
loss (``STOP`` rounds without a better one, at most ``ROUNDS``) and scored on the test split.
Both libraries keep their default trees (31 leaves, learning rate 0.1). Categorical columns go in
as category codes ranked by train-split frequency with native categorical splits (LightGBM's
``categorical_feature``, HistGradientBoosting's ``categorical_features``); a category unseen in
train, or missing, is a missing value, which both route natively. HistGradientBoosting takes at
most 255 categories a column: rarer ones count as missing there.

Training is seeded by the first of ``seeds`` and deterministic (LightGBM ``deterministic``, row-wise
histograms, ``runtime.threads`` threads), so the same params give the same metrics. The trees use
numeric and categorical columns only: with a text or image feature, or ``compare.reference:
none``, nothing is trained and the file holds ``{"_skipped": "<why>"}``, a note that ``compare``
shows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mtl import paths
from mtl.config import REFERENCES, Params
from mtl.errors import UserError
from mtl.io import read_table, remove_leftovers, write_json

if TYPE_CHECKING:
    from mtl.engine.tasks import Task

ROUNDS = 2000  # most boosting rounds; early stopping ends far sooner
STOP = 50  # rounds without a lower validation loss before training stops
HGB_CATEGORIES = 255  # HistGradientBoosting's largest number of categories in a column
Labels = tuple[np.ndarray, np.ndarray]  # targets and the mask of labelled rows (entries)


def run(params: Params) -> None:
    remove_leftovers(paths.REFERENCE_JSON)
    method = params.compare.reference
    if method == "none":  # before any import of torch: a second, not three
        return skip("reference skipped: compare.reference is none")
    from mtl.stages import encoded

    schema = encoded.read_inputs(params, paths.SPLITS)
    if note := skip_note(method, schema["features"]):
        return skip(note)
    metrics = trees(params, method, schema)
    write_json(metrics, paths.REFERENCE_JSON)
    summary = "; ".join(f"{t}: " + ", ".join(f"{k} {v}" for k, v in m.items()) for t, m in metrics.items())
    print(f"reference ({REFERENCES[method]}): {summary}")


def skip(note: str) -> None:
    write_json({paths.REFERENCE_SKIPPED: note}, paths.REFERENCE_JSON)
    print(note)


def skip_note(method: str, features: dict[str, dict]) -> str | None:
    """Why the trees cannot be trained on these features, or None."""
    for name, feature in features.items():
        if feature["kind"] in ("text", "image"):
            return (f"reference skipped: {feature['kind']} column '{name}' cannot be used by "
                    f"{REFERENCES[method]}, which takes numeric and categorical columns only")
    return None


def trees(params: Params, method: str, schema: dict) -> dict[str, dict]:
    """Each task's test metrics of its tree model (``score_outputs``: evaluate's format)."""
    import torch

    from mtl.stages.evaluate import score_outputs

    tables = {split: read_table(paths.split_path(split)) for split in paths.SPLITS}
    features = Features(tables["train"], schema["features"],
                        HGB_CATEGORIES if method == "hgb" else None)
    tasks = [task_of(name, schema, spec.loss) for name, spec in params.data.tasks.items()]
    labels = {split: {t.name: t.encode(*(table[c] for c in t.columns)) for t in tasks}
              for split, table in tables.items()}
    fit = Fit(method, {split: features.matrix(table) for split, table in tables.items()},
              features.categorical, params.seeds[0], params.threads())
    outputs = {t.name: torch.from_numpy(fit.task(t, _numpy(labels["train"][t.name]),
                                                 _numpy(labels["val"][t.name]))) for t in tasks}
    test = labels["test"]
    return score_outputs(tasks, outputs, {t: y for t, (y, _) in test.items()},
                         {t: m for t, (_, m) in test.items()})


def _numpy(labels: tuple) -> Labels:
    return labels[0].numpy(), labels[1].numpy()


def task_of(name: str, schema: dict, loss: str | None = None) -> Task:
    """The engine's task, for its label encoding and metrics; a regression target is scored in
    its own units (mean 0, std 1: the trees predict it unscaled), and its trees minimise the
    task's ``loss`` (squared or absolute error)."""
    from mtl.engine.tasks import Task
    from mtl.stages import encoded

    spec = schema["tasks"][name]
    if spec["kind"] == "regression":
        return Task(name, "regression", spec["target"], objective=loss or "mse")
    return encoded.task_from_schema(name, schema, {})


class Features:
    """The feature matrix the trees read: numeric columns as they are, categorical ones as codes
    0, 1, ... in order of train-split frequency (NaN: missing, unseen, or past ``limit``)."""

    def __init__(self, train: pa.Table, features: dict[str, dict], limit: int | None) -> None:
        self.columns = list(features)
        self.categorical = [i for i, name in enumerate(self.columns)
                            if features[name]["kind"] == "categorical"]
        self.categories = {self.columns[i]: self._ranked(train[self.columns[i]], limit)
                           for i in self.categorical}

    @staticmethod
    def _ranked(column: pa.ChunkedArray, limit: int | None) -> pa.Array:
        counts = pc.value_counts(column.drop_null()).flatten()  # values, counts
        order = pc.sort_indices(pa.table({"n": counts[1], "v": counts[0]}),
                                sort_keys=[("n", "descending"), ("v", "ascending")])
        return counts[0].take(order)[:limit]

    def matrix(self, table: pa.Table) -> np.ndarray:
        """[rows, features] float64."""
        return np.column_stack([self._column(table[name], name) for name in self.columns])

    def _column(self, column: pa.ChunkedArray, name: str) -> np.ndarray:
        if name in self.categories:
            column = pc.index_in(column, value_set=self.categories[name]).cast(pa.float64())
        return column.to_numpy().astype(np.float64)  # null -> NaN


class Fit:
    """Trains one model per task (per label) with ``method`` on ``inputs`` (split -> matrix) and
    gives its raw test scores, shaped as the networks' outputs."""

    def __init__(self, method: str, inputs: dict[str, np.ndarray], categorical: list[int],
                 seed: int, threads: int) -> None:
        self.method, self.inputs, self.categorical = method, inputs, categorical
        self.seed, self.threads = seed, threads

    def task(self, task: Task, train: Labels, val: Labels) -> np.ndarray:
        """[test rows, task.out_dim]: logits (binary, multilabel), class scores whose softmax is
        the class probabilities (multiclass), or values (regression)."""
        if task.kind == "multilabel":
            return np.stack([self.one(task, "binary", 2, _label(train, j), _label(val, j))
                             for j in range(len(task.classes))], axis=1)
        kind = "regression_l1" if task.objective == "l1" else task.kind  # LightGBM's name
        return self.one(task, kind, len(task.classes), train, val).reshape(
            len(self.inputs["test"]), -1)

    def one(self, task: Task, kind: str, classes: int, train: Labels, val: Labels) -> np.ndarray:
        (x, y), (x_val, y_val) = (_labelled(self.inputs[split], *labels)
                                  for split, labels in (("train", train), ("val", val)))
        if len(y_val) == 0:
            raise UserError(f"data.tasks.{task.name}: no labelled row in the val split to "
                            "early-stop the reference on")
        fit = _lightgbm if self.method == "lightgbm" else _hgb
        scores = fit(kind, classes, (x, y), (x_val, y_val), self.inputs["test"], self.categorical,
                     self.seed, self.threads)
        return np.asarray(scores, dtype=np.float32)


def _label(labels: Labels, j: int) -> Labels:
    return labels[0][:, j], labels[1][:, j]


def _labelled(x: np.ndarray, y: np.ndarray, mask: np.ndarray) -> Labels:
    """The rows of ``x`` and ``y`` whose label ``mask`` marks present."""
    return x[mask], y[mask]


def _lightgbm(kind: str, classes: int, train: tuple, val: tuple, test: np.ndarray,
              categorical: list[int], seed: int, threads: int) -> np.ndarray:
    """LightGBM's raw scores of ``test`` after training on ``train``, early-stopped on ``val``."""
    import lightgbm as lgb

    config = {"objective": kind, "seed": seed, "deterministic": True,
              "force_row_wise": True, "num_threads": threads, "verbosity": -1}
    if kind == "multiclass":
        config["num_class"] = classes
    data = lgb.Dataset(*train, categorical_feature=categorical, free_raw_data=False)
    booster = lgb.train(config, data, ROUNDS, valid_sets=[lgb.Dataset(*val, reference=data)],
                        callbacks=[lgb.early_stopping(STOP, verbose=False)])
    return booster.predict(test, raw_score=True, num_iteration=booster.best_iteration)


HGB_LOSSES = {"regression": "squared_error", "regression_l1": "absolute_error"}


def _hgb(kind: str, classes: int, train: tuple, val: tuple, test: np.ndarray,
         categorical: list[int], seed: int, threads: int) -> np.ndarray:
    """HistGradientBoosting's raw scores of ``test`` (a class absent from the train rows scores
    -1e9: probability 0), trained on ``train``, early-stopped on ``val``."""
    from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor
    from threadpoolctl import threadpool_limits

    options = {"max_iter": ROUNDS, "early_stopping": True, "n_iter_no_change": STOP,
               "scoring": "loss", "categorical_features": categorical or None, "random_state": seed}
    regression = kind.startswith("regression")
    model = (HistGradientBoostingRegressor(loss=HGB_LOSSES[kind], **options) if regression
             else HistGradientBoostingClassifier(**options))
    with threadpool_limits(threads):
        model.fit(*train, X_val=val[0], y_val=val[1])
        if regression:
            return model.predict(test)
        scores = model.decision_function(test)
    if kind == "binary":
        return scores
    if scores.ndim == 1:  # two classes seen: the log-odds of the second
        scores = np.stack([np.zeros_like(scores), scores], axis=1)
    full = np.full((len(test), classes), -1e9)
    full[:, model.classes_.astype(int)] = scores
    return full
