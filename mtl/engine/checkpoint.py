"""Saving a trained model with everything needed to use it again: architecture, tasks,
preprocessing and versions. Only tensors and plain Python values are stored, so loading works
with ``torch.load(weights_only=True)``; a file that does not load that way, or whose fields do
not have the structure ``save`` writes, raises ``NotOurs`` naming the field."""

from __future__ import annotations

import contextlib
import os
import pickle
import platform
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

import mtl
from mtl.engine import ARCH_OPTIONS, TASK_KINDS, archs
from mtl.engine.encoders import FeatureEncoder, Preprocessor
from mtl.engine.tasks import Task
from mtl.io import NUMBER, mismatch

# The structure ``Bundle.save`` writes (as ``mtl.io.mismatch`` reads it).
TASK = {"name": str, "kind": str, "target": (str, list, tuple), "classes": [str], "mean": NUMBER,
        "std": NUMBER}
SAVED = {"arch": str, "tasks": [TASK],
         "preprocessor": {"tabular": {"numeric": [str], "means": [NUMBER], "stds": [NUMBER],
                                      "indicators": [str], "categorical": [str],
                                      "vocabularies": [[str]]},
                          "text": (type(None), dict), "image": (type(None), dict)},
         "layers": {"hidden": [int], "head_hidden": [int], "dropout": NUMBER},
         "encoder": dict, "info": dict, "versions": dict, "state_dict": dict}
# The structure of the training state ``mtl.engine.trainer.fit`` writes after every epoch.
RUN_STATE = {"options": dict, "epoch": int, "stopped": bool, "model": dict, "weighting": dict,
             "optimizer": {"state": dict, "param_groups": list},
             "schedule": (type(None), dict), "plateau": (type(None), dict),
             "best": [{"loss": NUMBER, "epoch": int, "state": (type(None), dict)}],
             "rng": dict, "skipped": int}


# What torch.load raises for a damaged or foreign file.
UNLOADABLE = (pickle.UnpicklingError, zipfile.BadZipFile, OSError, EOFError, RuntimeError,
              ValueError, KeyError, TypeError, AttributeError, IndexError)


class NotOurs(ValueError):
    """A file that is not a model (or checkpoint) this project wrote; the message says why."""


@dataclass
class Bundle:
    model: nn.Module
    arch: str
    tasks: list[Task]
    preprocessor: Preprocessor
    layers: dict  # hidden, head_hidden, dropout, options: keyword arguments of archs.build
    info: dict  # anything JSON-like worth keeping (weighting, seed, epochs, ...)
    # dim, text_dim, image_channels, finetune: FeatureEncoder kwargs
    encoder: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)  # of mtl, torch and Python that saved a loaded bundle

    @classmethod
    def create(cls, arch: str, tasks: list[Task], preprocessor: Preprocessor,
               layers: dict, info: dict, encoder: dict | None = None) -> Bundle:
        encoder = encoder or {}

        def make_encoder() -> nn.Module:
            return FeatureEncoder(preprocessor, **encoder)

        model = archs.build(arch, make_encoder, tasks, **layers)
        return cls(model, arch, tasks, preprocessor, layers, info, encoder)

    def save(self, path: Path | str) -> None:
        """Write the bundle to ``path`` (through a Python file: a full disk is then an OSError
        that torch's RuntimeError carries as its context, not only a bare RuntimeError)."""
        state = {
            "arch": self.arch,
            "tasks": [t.state() for t in self.tasks],
            "preprocessor": self.preprocessor.state(),
            "layers": self.layers,
            "encoder": self.encoder,
            "info": self.info,
            "versions": versions(),
            "state_dict": {k: v.cpu() for k, v in self.model.state_dict().items()},
        }
        with open(path, "wb") as file:
            torch.save(state, file)

    @classmethod
    def load(cls, path: Path | str, device: torch.device | str = "cpu") -> Bundle:
        """The bundle ``save`` wrote to ``path``; ``NotOurs`` naming the field that is wrong."""
        saved = load_file(path, device)
        if problem := mismatch(saved, SAVED):
            raise NotOurs(problem)
        if saved["arch"] not in ARCH_OPTIONS:
            raise NotOurs(f"field 'arch': unknown architecture {saved['arch']!r}")
        for i, task in enumerate(saved["tasks"]):
            if task["kind"] not in TASK_KINDS:
                raise NotOurs(f"field 'tasks[{i}].kind': unknown task kind {task['kind']!r}")
        with _field("tasks"):
            tasks = [Task.from_state(t) for t in saved["tasks"]]
        with _field("preprocessor"):
            preprocessor = Preprocessor.from_state(saved["preprocessor"])
        with _field("layers"):
            bundle = cls.create(saved["arch"], tasks, preprocessor, saved["layers"], saved["info"],
                                saved["encoder"])
        with _field("state_dict"):
            bundle.model.load_state_dict(saved["state_dict"])
        bundle.model.to(device)
        bundle.versions = saved["versions"]
        return bundle


def versions() -> dict[str, str]:
    return {"mtl": mtl.__version__, "torch": str(torch.__version__), "python": platform.python_version()}


def load_file(path: Path | str, device: torch.device | str = "cpu") -> object:
    """``torch.load(weights_only=True)``, with torch's warnings (say, on an unusual pickle
    protocol) kept off the user's output; ``NotOurs`` with a short reason if the file does not
    load that way (never torch's advice to load it unsafely)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return torch.load(path, map_location=device, weights_only=True)
        except UNLOADABLE as exc:
            raise NotOurs(_unloadable(exc)) from None


def _unloadable(exc: Exception) -> str:
    """Why ``torch.load`` failed, in a few words."""
    if isinstance(exc, OSError) and exc.errno:
        return f"cannot be read: {os.strerror(exc.errno).lower()}"
    if isinstance(exc, EOFError):
        return "the file ends early"
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if isinstance(exc, pickle.UnpicklingError) and "weights_only" in str(exc):
        advice = ("weights_only", "Weights only", "Please file", "Check the documentation")
        detail = next((line for line in lines if not any(a in line for a in advice)), "")
        return f"it holds more than tensors and plain values: {detail.split('. ')[0]}".rstrip(": ")
    return (lines[0].split(". ")[0] if lines else type(exc).__name__)[:200]


@contextlib.contextmanager
def _field(name: str) -> Iterator[None]:
    """``NotOurs`` naming field ``name`` for an error building the model from it."""
    try:
        yield
    except (TypeError, ValueError, KeyError, RuntimeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise NotOurs(f"field '{name}': {reason[:200]}") from None
