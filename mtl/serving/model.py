"""The files of a release -> a ``Served`` model: the bundle of ``model.pt`` (preprocessing,
tasks) with the forward pass of its torch module, or of its ONNX export run by onnxruntime, and
the metadata ``GET /metadata`` answers."""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import torch

from mtl import paths
from mtl.engine.checkpoint import Bundle, NotOurs, versions
from mtl.errors import UserError
from mtl.stages.export import needs_extra, onnx_runner
from mtl.stages.predict import Forward, decode, torch_forward
from mtl.stages.trained import feature_columns, model_kinds

BACKENDS = ("torch", "onnx")
MODEL, ONNX, ONNX_JSON = "model.pt", "model.onnx", "model.onnx.json"  # names in a release

Files = dict[str, tuple[Path, bytes]]  # name in a release -> (where it was read, its bytes)


@dataclass(frozen=True)
class Source:
    """What a server serves: the trained model of ``variant`` and ``seed`` and, for the ONNX
    backend, its export ``onnx`` (with ``<onnx>.json`` next to it), under the project ``root``."""

    variant: str
    seed: int
    onnx: str | None = None
    root: str = "."

    @property
    def backend(self) -> str:
        return "torch" if self.onnx is None else "onnx"

    def paths(self) -> dict[str, Path]:
        """Name in a release -> the file it is copied from."""
        files = {MODEL: Path(self.root) / paths.model_dir(self.variant, self.seed) / "model.pt"}
        if self.onnx is not None:
            files |= {ONNX: Path(self.onnx), ONNX_JSON: Path(f"{self.onnx}.json")}
        return files


@dataclass(frozen=True)
class Served:
    """A loaded model: its bundle, its forward pass (inputs -> raw outputs) and its metadata."""

    bundle: Bundle
    forward: Forward
    metadata: dict


def read(files: dict[str, Path]) -> Files:
    """Each file's bytes, read once; one line naming a file that cannot be read."""
    read_files = {}
    for name, path in files.items():
        try:
            read_files[name] = (path, path.read_bytes())
        except FileNotFoundError:
            raise UserError(f"{path}: file not found") from None
        except OSError as exc:
            raise UserError(f"{path}: cannot be read: {os.strerror(exc.errno).lower()}") from None
    return read_files


def load(source: Source, files: Files) -> Served:
    """The model in ``files`` (as ``read`` returns them); one line naming a file that is not
    what ``mtl train`` or ``mtl export`` wrote, or an export of another model."""
    path, data = files[MODEL]
    try:
        bundle = Bundle.load(io.BytesIO(data))
    except NotOurs as exc:
        raise UserError(f"{path} is not a model written by mtl-pipeline ({exc})") from None
    sha = hashlib.sha256(data).hexdigest()
    forward = torch_forward(bundle.model) if source.onnx is None else onnx_forward(files, sha)
    return Served(bundle, forward, metadata(source, bundle, sha))


def onnx_forward(files: Files, model_sha256: str) -> Forward:
    """The forward pass of the ONNX export in ``files``, which must come from the model whose
    ``model.pt`` has the SHA-256 ``model_sha256``; with as many threads as torch has."""
    (onnx, data), (spec_path, spec) = files[ONNX], files[ONNX_JSON]
    try:
        spec = json.loads(spec)
    except ValueError:
        raise UserError(f"{spec_path}: not valid JSON (run 'mtl export' again)") from None
    if not isinstance(spec, dict) or spec.get("model_sha256") != model_sha256:
        raise UserError(f"{onnx}: exported from another model than {files[MODEL][0]}; run "
                        f"'mtl export --format onnx --output {onnx}' again") from None
    names, tasks = [i["key"] for i in spec["inputs"]], [o["task"] for o in spec["outputs"]]
    with needs_extra("--backend onnx"):
        from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidGraph, InvalidProtobuf
    try:
        runner = onnx_runner(data, names, threads=torch.get_num_threads())
    except (Fail, InvalidGraph, InvalidProtobuf) as exc:
        raise UserError(f"{onnx}: onnxruntime cannot load it ({str(exc).splitlines()[0][:200]})") from None
    return lambda inputs: dict(zip(tasks, runner(tuple(inputs[n] for n in names))))


def metadata(source: Source, bundle: Bundle, sha: str) -> dict:
    """What ``GET /metadata`` says about the served model."""
    kinds = model_kinds(bundle)
    tasks = [{"name": t.name, "kind": t.kind, "target": list(t.columns)}
             | ({"mean": t.mean, "std": t.std} if t.kind == "regression" else {"classes": list(t.classes)})
             for t in bundle.tasks]
    empty = {t.name: torch.zeros(0, t.out_dim) for t in bundle.tasks}
    serving = versions() | {"fastapi": version("fastapi"), "uvicorn": version("uvicorn")}
    if source.backend == "onnx":
        serving["onnxruntime"] = version("onnxruntime")
    return {"variant": source.variant, "seed": source.seed, "backend": source.backend,
            "arch": bundle.arch, "tasks": tasks,
            "inputs": [{"name": c, "kind": kinds[c]} for c in feature_columns(bundle.preprocessor)],
            "outputs": list(decode(bundle.tasks, empty)),
            "model_sha256": sha, "training_inputs_sha256": bundle.info.get("inputs_sha256"),
            "versions": {"trained": bundle.versions, "serving": serving}}
