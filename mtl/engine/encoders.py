"""Feature encoders: a ``Preprocessor`` turns a table into input tensors, one part per feature
kind, and the ``FeatureEncoder`` built from it maps those tensors to one vector per row.

- Tabular: numeric columns standardised with train-split statistics (missing values imputed
  with the train mean plus a missing-indicator), then fed as they are (``standard``), as
  piecewise-linear encodings over train-split quantile bins (``ple``) or as learned periodic
  embeddings (``periodic``, "PLR"), both from Gorishniy et al., NeurIPS 2022, "On Embeddings for
  Numerical Features in Tabular Deep Learning", built with the authors' package
  ``rtdl_num_embeddings``; categorical columns embedded with index 0 reserved for unseen or
  missing categories, each ``embedding_width`` wide.
- Text: hashed n-gram embeddings, or MiniLM sentence embeddings, frozen or fine-tuned
  (``mtl.engine.text``).
- Image: a small CNN over raw grey-scale pixels (``mtl.engine.image``).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from types import ModuleType

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch import nn

from mtl.engine.image import ImageInput, SmallCNN
from mtl.engine.text import HashedText, HashedTextEncoder, MiniLMEncoder, MiniLMText, MiniLMTokens

# What preprocessing is fitted on: a table, or its chunks (tables or record batches) one by one.
Chunks = pa.Table | Iterable[pa.Table | pa.RecordBatch]


def chunks_of(data: Chunks) -> Iterable[pa.Table | pa.RecordBatch]:
    """``data``'s chunks: a table is one chunk."""
    return [data] if isinstance(data, pa.Table) else data


class Moments:
    """Count, mean and population standard deviation of the finite values seen so far, updated
    chunk by chunk with Chan et al.'s parallel formula (merging each chunk's count, mean and sum
    of squared deviations M2): one pass, memory independent of the number of values."""

    def __init__(self):
        self.count, self._mean, self._m2 = 0, 0.0, 0.0

    def update(self, values: np.ndarray) -> None:
        """Add the finite values of the float64 array ``values``."""
        finite = values[np.isfinite(values)]
        n = len(finite)
        if n == 0:
            return
        mean = float(finite.mean())
        m2 = float(np.square(finite - mean).sum())
        if self.count == 0:
            self.count, self._mean, self._m2 = n, mean, m2
            return
        total = self.count + n
        delta = mean - self._mean
        self._mean += delta * n / total
        self._m2 += m2 + delta * delta * self.count * n / total
        self.count = total

    @property
    def mean(self) -> float:
        """The mean (0 before any finite value)."""
        return self._mean

    @property
    def std(self) -> float:
        """The population standard deviation, ``np.std``'s (0 for fewer than 2 values)."""
        return math.sqrt(self._m2 / self.count) if self.count > 1 else 0.0


class Reservoir:
    """A uniform sample of at most ``size`` of the finite values seen so far (Vitter's
    Algorithm R, vectorised per chunk, seeded): the values themselves while there are at most
    ``size``, so quantiles of the sample are exact up to ``size`` values and within about
    ``1 / sqrt(size)`` in rank beyond; memory independent of the number of values."""

    def __init__(self, size: int, seed: int = 0):
        self.size, self.count = size, 0
        self.values = np.empty(0)
        self._rng = np.random.default_rng(seed)

    def update(self, values: np.ndarray) -> None:
        """Add the finite values of the float64 array ``values``."""
        finite = values[np.isfinite(values)]
        room = max(0, self.size - len(self.values))
        self.values = np.concatenate([self.values, finite[:room]])
        rest = finite[room:]
        seen = self.count + room + np.arange(len(rest))  # values seen before each of the rest
        slots = (self._rng.random(len(rest)) * (seen + 1)).astype(np.int64)
        keep = slots < self.size
        self.values[slots[keep]] = rest[keep]  # repeated slots: the later value wins, as in R
        self.count += len(finite)


def rtdl() -> ModuleType:
    """``rtdl_num_embeddings``, imported without scikit-learn: it imports ``sklearn.tree`` (and
    with it scipy, seconds of start-up for ``mtl evaluate``) only for tree-based bins, which
    this project does not use. Where scikit-learn is already imported, it is left alone."""
    if "rtdl_num_embeddings" not in sys.modules:
        block = "sklearn" not in sys.modules
        if block:
            sys.modules["sklearn"] = None  # type: ignore[assignment]  # import sklearn: ImportError
        try:
            import rtdl_num_embeddings  # noqa: F401
        finally:
            if block:
                del sys.modules["sklearn"]
    return sys.modules["rtdl_num_embeddings"]


# Values sampled per numeric column for the ``ple`` bins (see ``Reservoir``).
BIN_SAMPLE = 2**16


def quantile_bins(values: np.ndarray, n_bins: int) -> tuple[float, ...]:
    """Bin edges at ``n_bins`` quantiles of the finite ``values`` (``compute_bins``, identical
    edges merged; fewer bins than values - 1); ``(-1, 1)`` where fewer than 2 distinct values
    leave nothing to bin, and one bin between two values."""
    values = values[np.isfinite(values)]
    distinct = np.unique(values)
    if len(distinct) < 2:
        return (-1.0, 1.0)
    if len(values) < 3:
        return tuple(distinct.tolist())
    column = torch.as_tensor(values, dtype=torch.float64)[:, None]
    return tuple(rtdl().compute_bins(column, min(n_bins, len(values) - 1))[0].tolist())


@dataclass(frozen=True)
class TabularPreprocessor:
    """Turns an Arrow table into the tensors ``{"num": float32 [N, D], "cat": int64 [N, C]}``."""

    numeric: tuple[str, ...]
    means: tuple[float, ...]
    stds: tuple[float, ...]
    indicators: tuple[str, ...]  # numeric columns that also get a was-missing 0/1 input
    categorical: tuple[str, ...]
    vocabularies: tuple[tuple[str, ...], ...]
    bins: tuple[tuple[float, ...], ...] = ()  # per numeric column, in standardised units (ple)

    @classmethod
    def fit(cls, data: Chunks, numeric: list[str], categorical: list[str],
            indicators: list[str], bins: int | None = None) -> TabularPreprocessor:
        """Means and standard deviations of the finite values of ``numeric`` (0 and 1 when there
        are none; a standard deviation of 0, or of fewer than 2 values, is 1), the sorted
        vocabulary of each ``categorical`` column and, given ``bins``, that many quantile bins of
        each standardised ``numeric`` column (from a ``Reservoir`` sample), in one pass over
        ``data``'s chunks."""
        moments = {name: Moments() for name in numeric}
        samples = {name: Reservoir(BIN_SAMPLE, seed=i) for i, name in enumerate(numeric)} if bins else {}
        seen: dict[str, set[str]] = {name: set() for name in categorical}
        for chunk in chunks_of(data):
            for name in numeric:
                moments[name].update(values := _floats(chunk[name]))
                if bins:
                    samples[name].update(values)
            for name in categorical:
                seen[name].update(pc.unique(chunk[name].cast(pa.string())).drop_null().to_pylist())
        means = tuple(moments[name].mean for name in numeric)
        stds = tuple(s if s > 0 else 1.0 for s in (moments[name].std for name in numeric))
        edges = tuple(quantile_bins((samples[name].values - mean) / std, bins)
                      for name, mean, std in zip(numeric, means, stds)) if bins else ()
        vocabularies = tuple(tuple(sorted(seen[name])) for name in categorical)
        return cls(tuple(numeric), means, stds, tuple(indicators), tuple(categorical), vocabularies,
                   edges)

    def transform(self, table: pa.Table) -> dict[str, torch.Tensor]:
        columns = []
        for name, mean, std in zip(self.numeric, self.means, self.stds):
            values = _floats(table[name])
            columns.append(np.where(np.isfinite(values), (values - mean) / std, 0.0))
        for name in self.indicators:
            columns.append((~np.isfinite(_floats(table[name]))).astype("float64"))
        num = np.stack(columns, axis=1) if columns else np.zeros((table.num_rows, 0))
        codes = []
        for name, vocab in zip(self.categorical, self.vocabularies):
            index = pc.index_in(table[name].cast(pa.string()), value_set=pa.array(vocab, pa.string()))
            codes.append(pc.fill_null(pc.add(index, 1), 0).to_numpy())
        cat = np.stack(codes, axis=1) if codes else np.zeros((table.num_rows, 0))
        return {"num": torch.from_numpy(num.astype("float32")),
                "cat": torch.from_numpy(cat.astype("int64"))}

    @property
    def num_dim(self) -> int:
        return len(self.numeric) + len(self.indicators)

    @property
    def cardinalities(self) -> list[int]:
        return [len(v) + 1 for v in self.vocabularies]

    def state(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict) -> TabularPreprocessor:
        return cls(**{k: tuple(tuple(x) if isinstance(x, list) else x for x in v)
                      for k, v in state.items()})


def _floats(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return column.cast(pa.float64()).to_numpy(zero_copy_only=False).astype("float64")


def embedding_width(n: int) -> int:
    """The width of a categorical column's embedding for ``n`` indices: half of them, at most 16
    (fastai 0.7's rule ``min(50, (n + 1) // 2)`` with a cap of 16). fastai 2's
    ``min(600, round(1.6 * n ** 0.56))`` showed no measured gain on Adult (BENCHMARKS.md)."""
    return min(16, (n + 1) // 2)


def numeric_encoding(p: TabularPreprocessor, kind: str = "standard",
                     periodic: dict | None = None) -> nn.Module | None:
    """The module ``kind`` puts over the standardised numeric columns: none (``standard``),
    ``PiecewiseLinearEncoding`` over ``p``'s bins (``ple``: no parameters), or
    ``PeriodicEmbeddings`` (``periodic``: cos and sin of learned frequencies, then a linear layer
    and ReLU, the paper's PLR; ``periodic``: ``encoders.periodic``, its ``frequencies``, ``sigma``,
    ``dim`` and ``lite``)."""
    if kind == "standard" or not p.numeric:
        return None
    if kind == "ple":
        if len(p.bins) != len(p.numeric):
            raise ValueError("numeric encoding 'ple' needs bins fitted with the preprocessing")
        return rtdl().PiecewiseLinearEncoding([torch.tensor(b, dtype=torch.float32) for b in p.bins])
    o = periodic or {}
    return rtdl().PeriodicEmbeddings(len(p.numeric), o["dim"], n_frequencies=o["frequencies"],
                                     frequency_init_scale=o["sigma"], lite=o["lite"])


class TabularEncoder(nn.Module):
    """The numeric inputs, the first ``n_numeric`` through ``numeric`` (flattened) where given,
    the missing-indicators after them as they are, then one ``embedding_width``-wide embedding
    per categorical column."""

    def __init__(self, num_dim: int, cardinalities: list[int], numeric: nn.Module | None = None,
                 n_numeric: int = 0):
        super().__init__()
        self.numeric, self.n_numeric = numeric, n_numeric
        width = num_dim if numeric is None else num_dim - n_numeric + numeric.get_output_shape().numel()
        self.embeddings = nn.ModuleList(nn.Embedding(c, embedding_width(c)) for c in cardinalities)
        self.out_dim = width + sum(e.embedding_dim for e in self.embeddings)

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        num = inputs["num"]
        if self.numeric is not None:
            encoded = self.numeric(num[:, :self.n_numeric]).flatten(1)
            num = torch.cat([encoded, num[:, self.n_numeric:]], dim=1)
        parts = [num] + [emb(inputs["cat"][:, i]) for i, emb in enumerate(self.embeddings)]
        return torch.cat(parts, dim=1)


TEXT_PARTS = {"hashed": HashedText, "minilm": MiniLMText, "minilm_tokens": MiniLMTokens}


@dataclass(frozen=True)
class Preprocessor:
    """A table -> the model's inputs: "num" and "cat" from the tabular part, plus "text"
    (hashed n-gram ids), "text_emb" (MiniLM embeddings) or MiniLM's token ids and masks (to
    fine-tune it), and "image" where such columns exist.
    Its state holds plain values only, for ``torch.load(weights_only=True)``."""

    tabular: TabularPreprocessor
    text: HashedText | MiniLMText | MiniLMTokens | None = None
    image: ImageInput | None = None

    @classmethod
    def fit(cls, data: Chunks, features: dict[str, dict], text: str = "hashed",
            hashing: dict | None = None, max_length: int | None = None,
            bins: int | None = None) -> Preprocessor:
        """Fitted on ``data``, a table or an iterable of tables or record batches, in one pass
        over it (only the tabular part learns from the data); ``features``: each column's record
        in schema.json (kind, n_missing, image shape); ``hashing``: keyword arguments of
        ``HashedText`` (buckets, n-gram ranges, max_tokens); ``max_length``: with ``minilm``,
        None for frozen sentence vectors, else token ids of at most that many tokens; ``bins``:
        quantile bins per numeric column to fit (for ``ple``), or None."""
        of = lambda kind: [name for name, f in features.items() if f["kind"] == kind]
        numeric = of("numeric")
        tabular = TabularPreprocessor.fit(data, numeric, of("categorical"), bins=bins,
                                          indicators=[n for n in numeric if features[n]["n_missing"] > 0])
        texts, images = tuple(of("text")), tuple(of("image"))
        text_part = None
        if texts and text == "minilm":
            text_part = MiniLMText(texts) if max_length is None else MiniLMTokens(texts, max_length)
        elif texts:
            text_part = HashedText(texts, **_tuples(hashing or {}))
        image_part = ImageInput(images, tuple(features[images[0]]["shape"])) if images else None
        return cls(tabular, text_part, image_part)

    def transform(self, table: pa.Table) -> dict[str, torch.Tensor]:
        inputs = self.tabular.transform(table)
        for part in (self.text, self.image):
            if part is not None:
                inputs |= part.transform(table)
        return inputs

    def state(self) -> dict:
        text = None if self.text is None else {
            "kind": next(k for k, c in TEXT_PARTS.items() if isinstance(self.text, c))} | asdict(self.text)
        return {"tabular": self.tabular.state(), "text": text,
                "image": None if self.image is None else asdict(self.image)}

    @classmethod
    def from_state(cls, state: dict) -> Preprocessor:
        text = state["text"]
        return cls(TabularPreprocessor.from_state(state["tabular"]),
                   None if text is None else TEXT_PARTS[text["kind"]](
                       **_tuples({k: v for k, v in text.items() if k != "kind"})),
                   None if state["image"] is None else ImageInput(**_tuples(state["image"])))


def _tuples(values: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}


class FeatureEncoder(nn.Module):
    """The inputs of a ``Preprocessor`` -> [N, out_dim]: the ``TabularEncoder``'s output (its
    numeric columns through ``numeric_encoding(numeric, periodic)``) concatenated with, where
    present, the ``HashedTextEncoder``'s, a linear projection of the MiniLM embeddings (or the
    fine-tuned ``MiniLMEncoder``'s, built with the ``finetune`` settings), and the
    ``SmallCNN``'s (the hashed text part ``text_dim`` wide, the others ``dim``; ``text_dim``
    None: ``dim``, as models saved before it existed)."""

    def __init__(self, preprocessor: Preprocessor, dim: int = 32,
                 image_channels: Sequence[int] = (16, 32), text_dim: int | None = None,
                 finetune: dict | None = None, numeric: str = "standard",
                 periodic: dict | None = None):
        super().__init__()
        p = preprocessor
        self.tabular = TabularEncoder(p.tabular.num_dim, p.tabular.cardinalities,
                                      numeric_encoding(p.tabular, numeric, periodic),
                                      len(p.tabular.numeric))
        self.parts = nn.ModuleDict()  # input name -> its encoder
        widths = []
        if isinstance(p.text, HashedText):
            self.parts["text"] = HashedTextEncoder(p.text.buckets, text_dim or dim)
            widths.append(text_dim or dim)
        elif isinstance(p.text, MiniLMText):
            self.parts["text_emb"] = nn.Linear(p.text.dim, dim)
            widths.append(dim)
        elif isinstance(p.text, MiniLMTokens):
            options = {k: v for k, v in (finetune or {}).items() if k != "max_length"}
            self.parts["text_tokens"] = MiniLMEncoder(len(p.text.columns), dim, **options)
            widths.append(dim)
        if p.image is not None:
            self.parts["image"] = SmallCNN(len(p.image.columns), p.image.shape, image_channels, dim)
            widths.append(dim)
        self.out_dim = self.tabular.out_dim + sum(widths)
        # Each input feature's width, in order (an ensemble's adapter starts equal within each).
        n = len(p.tabular.numeric)
        numbers = ([len(b) - 1 for b in p.tabular.bins] if numeric == "ple" and n else
                   [(periodic or {})["dim"]] * n if numeric == "periodic" else [1] * n)
        self.plain_numbers = numeric == "standard"
        self.chunks = (numbers + [1] * (p.tabular.num_dim - n)
                       + [e.embedding_dim for e in self.tabular.embeddings] + widths)

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        parts = [self.tabular(inputs)] + [enc(inputs if name == "text_tokens" else inputs[name])
                                          for name, enc in self.parts.items()]
        return torch.cat(parts, dim=1)
