"""Feature encoders. Tabular: numeric columns standardised with train-split statistics (missing
values imputed with the train mean plus a missing-indicator), categorical columns embedded with
index 0 reserved for unseen or missing categories."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch import nn


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
    def fit(cls, table: pa.Table, numeric: list[str], categorical: list[str],
            indicators: list[str]) -> TabularPreprocessor:
        means, stds = [], []
        for name in numeric:
            values = _floats(table[name])
            finite = values[np.isfinite(values)]
            means.append(float(finite.mean()) if len(finite) else 0.0)
            std = float(finite.std()) if len(finite) > 1 else 0.0
            stds.append(std if std > 0 else 1.0)
        vocabularies = tuple(
            tuple(sorted(v for v in pc.unique(table[name].cast(pa.string())).to_pylist() if v is not None))
            for name in categorical)
        return cls(tuple(numeric), tuple(means), tuple(stds), tuple(indicators),
                   tuple(categorical), vocabularies)

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


def _floats(column: pa.ChunkedArray) -> np.ndarray:
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
