"""Task kinds: how target columns become a tensor with a label mask, the loss averaged over
labelled entries only, and the test metrics (``mtl.engine.metrics``).

A multilabel task reads one 0/1 column per label; its targets and mask are [rows, labels], each
(row, label) entry labelled or not on its own."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.nn.functional as F

from mtl.engine import metrics


@dataclass(frozen=True)
class Task:
    name: str
    kind: str  # binary | multiclass | multilabel | regression
    target: str | tuple[str, ...]  # multilabel: one column per label
    classes: tuple[str, ...] = ()  # classification: index -> label; binary: classes[1] is positive;
    # multilabel: the label names (= the target columns)
    mean: float = 0.0  # regression: the target is standardised with train-split statistics
    std: float = 1.0
    objective: str = "mse"  # regression: mse | l1, the loss of the standardised target

    @property
    def out_dim(self) -> int:
        return len(self.classes) if self.kind in ("multiclass", "multilabel") else 1

    @property
    def columns(self) -> tuple[str, ...]:
        """The table columns ``encode`` reads."""
        return (self.target,) if isinstance(self.target, str) else self.target

    def state(self) -> dict:
        return asdict(self) | {"classes": list(self.classes)}

    @classmethod
    def from_state(cls, state: dict) -> Task:
        target = state["target"] if isinstance(state["target"], str) else tuple(state["target"])
        return cls(**(state | {"target": target, "classes": tuple(state["classes"])}))

    def encode(self, *columns: pa.ChunkedArray) -> tuple[torch.Tensor, torch.Tensor]:
        """Targets and a boolean mask of labelled rows (entries for multilabel, from one column
        per label); unlabelled ones get a dummy 0."""
        if self.kind == "multilabel":
            values = torch.stack([torch.tensor(c.cast(pa.float64()).to_numpy(zero_copy_only=False))
                                  for c in columns], dim=1)
            mask = torch.isfinite(values)
            return torch.where(mask, values, 0.0).float(), mask
        (column,) = columns
        if self.kind == "regression":
            values = torch.from_numpy(column.to_numpy(zero_copy_only=False).astype("float64"))
            mask = torch.isfinite(values)
            y = torch.where(mask, (values - self.mean) / self.std, 0.0).float()
            return y, mask
        index = pc.index_in(column.cast(pa.string()), value_set=pa.array(self.classes, pa.string()))
        mask = torch.from_numpy(index.is_valid().to_numpy(zero_copy_only=False).copy())
        y = torch.from_numpy(pc.fill_null(index, 0).to_numpy().astype("int64"))
        return (y.float() if self.kind == "binary" else y), mask

    def loss(self, out: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean loss over the labelled rows (entries for multilabel) of the batch (0 when none is
        labelled). Outputs of k ensemble members, [rows, k, out]: the mean of the members' losses."""
        if out.dim() == 3:
            k = out.shape[1]
            out, y, mask = out.flatten(0, 1), y.repeat_interleave(k, 0), mask.repeat_interleave(k, 0)
        if self.kind == "multiclass":
            per_row = F.cross_entropy(out, y, reduction="none")
        elif self.kind == "multilabel":
            per_row = F.binary_cross_entropy_with_logits(out, y, reduction="none")
        elif self.kind == "binary":
            per_row = F.binary_cross_entropy_with_logits(out[:, 0], y, reduction="none")
        else:
            loss = F.l1_loss if self.objective == "l1" else F.mse_loss
            per_row = loss(out[:, 0], y, reduction="none")
        weight = mask.to(per_row.dtype)
        return (per_row * weight).sum() / weight.sum().clamp(min=1.0)

    def metrics(self, out: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
        """Test metrics over labelled rows (entries), regression in the target's original units;
        multilabel metrics are macro averages over the labels (``mtl.engine.metrics``)."""
        if self.kind == "multilabel":
            if not mask.any():
                return {}
            return metrics.multilabel(out.float().sigmoid(), torch.where(mask, y.long(), -1))
        out, y = out[mask].float(), y[mask]
        if len(y) == 0:
            return {}
        if self.kind == "regression":
            return metrics.regression(self.decode(out), y * self.std + self.mean)
        if self.kind == "multiclass":
            probs = out.softmax(dim=1)
            pred, auroc = probs.argmax(dim=1), metrics.auroc_macro(probs, F.one_hot(y, len(self.classes)))
        else:  # binary: the positive class is classes[1]
            p, y = out[:, 0].sigmoid(), y.long()
            pred, auroc = (p > 0.5).long(), metrics.auroc(p, y == 1)
        return {"accuracy": metrics.accuracy(pred, y),
                "f1_macro": metrics.f1_macro(pred, y, len(self.classes)), "auroc": auroc}

    def decode(self, out: torch.Tensor) -> torch.Tensor:
        """Model output -> class (label) probabilities (classification) or values in original units."""
        if self.kind == "multiclass":
            return out.softmax(dim=1)
        if self.kind == "multilabel":
            return out.sigmoid()
        if self.kind == "binary":
            return out[:, 0].sigmoid()
        return out[:, 0] * self.std + self.mean
