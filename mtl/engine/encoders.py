"""Feature encoders: a ``Preprocessor`` turns a table into input tensors, one part per feature
kind, and the ``FeatureEncoder`` built from it maps those tensors to one vector per row.

- Tabular: numeric columns standardised with train-split statistics (missing values imputed
  with the train mean plus a missing-indicator), categorical columns embedded with index 0
  reserved for unseen or missing categories.
- Text: hashed n-gram embeddings or frozen MiniLM sentence embeddings (``mtl.engine.text``).
- Image: a small CNN over raw grey-scale pixels (``mtl.engine.image``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch import nn

from mtl.engine.image import ImageInput, SmallCNN
from mtl.engine.text import HashedText, HashedTextEncoder, MiniLMText

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


@dataclass(frozen=True)
class TabularPreprocessor:
    """Turns an Arrow table into the tensors ``{"num": float32 [N, D], "cat": int64 [N, C]}``."""

    numeric: tuple[str, ...]
    means: tuple[float, ...]
    stds: tuple[float, ...]
    indicators: tuple[str, ...]  # numeric columns that also get a was-missing 0/1 input
    categorical: tuple[str, ...]
    vocabularies: tuple[tuple[str, ...], ...]

    @classmethod
    def fit(cls, data: Chunks, numeric: list[str], categorical: list[str],
            indicators: list[str]) -> TabularPreprocessor:
        """Means and standard deviations of the finite values of ``numeric`` (0 and 1 when there
        are none; a standard deviation of 0, or of fewer than 2 values, is 1), and the sorted
        vocabulary of each ``categorical`` column, in one pass over ``data``'s chunks."""
        moments = {name: Moments() for name in numeric}
        seen: dict[str, set[str]] = {name: set() for name in categorical}
        for chunk in chunks_of(data):
            for name in numeric:
                moments[name].update(_floats(chunk[name]))
            for name in categorical:
                seen[name].update(pc.unique(chunk[name].cast(pa.string())).drop_null().to_pylist())
        means = tuple(moments[name].mean for name in numeric)
        stds = tuple(s if s > 0 else 1.0 for s in (moments[name].std for name in numeric))
        vocabularies = tuple(tuple(sorted(seen[name])) for name in categorical)
        return cls(tuple(numeric), means, stds, tuple(indicators), tuple(categorical), vocabularies)

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


class TabularEncoder(nn.Module):
    """Standardised numeric inputs concatenated with one embedding per categorical column."""

    def __init__(self, num_dim: int, cardinalities: list[int]):
        super().__init__()
        self.embeddings = nn.ModuleList(nn.Embedding(n, min(16, (n + 1) // 2)) for n in cardinalities)
        self.out_dim = num_dim + sum(e.embedding_dim for e in self.embeddings)

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        parts = [inputs["num"]] + [emb(inputs["cat"][:, i]) for i, emb in enumerate(self.embeddings)]
        return torch.cat(parts, dim=1)


TEXT_PARTS = {"hashed": HashedText, "minilm": MiniLMText}


@dataclass(frozen=True)
class Preprocessor:
    """A table -> the model's inputs: "num" and "cat" from the tabular part, plus "text"
    (hashed n-gram ids) or "text_emb" (MiniLM embeddings), and "image" where such columns exist.
    Its state holds plain values only, for ``torch.load(weights_only=True)``."""

    tabular: TabularPreprocessor
    text: HashedText | MiniLMText | None = None
    image: ImageInput | None = None

    @classmethod
    def fit(cls, data: Chunks, features: dict[str, dict], text: str = "hashed",
            hashing: dict | None = None) -> Preprocessor:
        """Fitted on ``data``, a table or an iterable of tables or record batches, in one pass
        over it (only the tabular part learns from the data); ``features``: each column's record
        in schema.json (kind, n_missing, image shape); ``hashing``: keyword arguments of
        ``HashedText`` (buckets, n-gram ranges, max_tokens)."""
        of = lambda kind: [name for name, f in features.items() if f["kind"] == kind]
        numeric = of("numeric")
        tabular = TabularPreprocessor.fit(data, numeric, of("categorical"),
                                          indicators=[n for n in numeric if features[n]["n_missing"] > 0])
        texts, images = tuple(of("text")), tuple(of("image"))
        text_part = None
        if texts and text == "minilm":
            text_part = MiniLMText(texts)
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
    """The inputs of a ``Preprocessor`` -> [N, out_dim]: the ``TabularEncoder``'s output
    concatenated with, where present, the ``HashedTextEncoder``'s, a linear projection of the
    MiniLM embeddings, and the ``SmallCNN``'s (the hashed text part ``text_dim`` wide, the
    others ``dim``; ``text_dim`` None: ``dim``, as models saved before it existed)."""

    def __init__(self, preprocessor: Preprocessor, dim: int = 32,
                 image_channels: Sequence[int] = (16, 32), text_dim: int | None = None):
        super().__init__()
        p = preprocessor
        self.tabular = TabularEncoder(p.tabular.num_dim, p.tabular.cardinalities)
        self.parts = nn.ModuleDict()  # input name -> its encoder
        widths = []
        if isinstance(p.text, HashedText):
            self.parts["text"] = HashedTextEncoder(p.text.buckets, text_dim or dim)
            widths.append(text_dim or dim)
        elif isinstance(p.text, MiniLMText):
            self.parts["text_emb"] = nn.Linear(p.text.dim, dim)
            widths.append(dim)
        if p.image is not None:
            self.parts["image"] = SmallCNN(len(p.image.columns), p.image.shape, image_channels, dim)
            widths.append(dim)
        self.out_dim = self.tabular.out_dim + sum(widths)

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        parts = [self.tabular(inputs)] + [enc(inputs[name]) for name, enc in self.parts.items()]
        return torch.cat(parts, dim=1)
