"""Saving a trained model with everything needed to use it again: architecture, tasks,
preprocessing and versions. Only tensors and plain Python values are stored, so loading works
with ``torch.load(weights_only=True)``."""

from __future__ import annotations

import platform
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

import mtl
from mtl.engine import archs
from mtl.engine.encoders import FeatureEncoder, Preprocessor
from mtl.engine.tasks import Task


@dataclass
class Bundle:
    model: nn.Module
    arch: str
    tasks: list[Task]
    preprocessor: Preprocessor
    layers: dict  # hidden, head_hidden, dropout, options: keyword arguments of archs.build
    info: dict  # anything JSON-like worth keeping (weighting, seed, epochs, ...)
    encoder: dict = field(default_factory=dict)  # dim, image_channels: keyword arguments of FeatureEncoder

    @classmethod
    def create(cls, arch: str, tasks: list[Task], preprocessor: Preprocessor,
               layers: dict, info: dict, encoder: dict | None = None) -> Bundle:
        encoder = encoder or {}

        def make_encoder() -> nn.Module:
            return FeatureEncoder(preprocessor, **encoder)

        model = archs.build(arch, make_encoder, tasks, **layers)
        return cls(model, arch, tasks, preprocessor, layers, info, encoder)

    def save(self, path: Path | str) -> None:
        torch.save({
            "arch": self.arch,
            "tasks": [t.state() for t in self.tasks],
            "preprocessor": self.preprocessor.state(),
            "layers": self.layers,
            "encoder": self.encoder,
            "info": self.info,
            "versions": versions(),
            "state_dict": {k: v.cpu() for k, v in self.model.state_dict().items()},
        }, path)

    @classmethod
    def load(cls, path: Path | str, device: torch.device | str = "cpu") -> Bundle:
        saved = torch.load(path, map_location=device, weights_only=True)
        bundle = cls.create(saved["arch"], [Task.from_state(t) for t in saved["tasks"]],
                            Preprocessor.from_state(saved["preprocessor"]),
                            saved["layers"], saved["info"], saved["encoder"])
        bundle.model.load_state_dict(saved["state_dict"])
        bundle.model.to(device)
        return bundle


def versions() -> dict[str, str]:
    return {"mtl": mtl.__version__, "torch": str(torch.__version__), "python": platform.python_version()}
