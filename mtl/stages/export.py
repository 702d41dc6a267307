"""``mtl export``: a trained variant's network -> a TorchScript or ONNX file that runs without
this package, optionally pruned and with int8 weights, plus two JSON files next to it:

- ``<PATH>.json``: the inputs (names, dtypes, shapes), the outputs (one raw tensor per task, in
  task order) and how to read them (classes, regression mean and std), the preprocessing
  state that turns a table into the inputs (for a fine-tuned MiniLM, ``tokenizer`` names the
  tokenizer that makes its token ids and masks), and the SHA-256 of the ``model.pt`` it came
  from;
- ``<PATH>.metrics.json``: the test-split metrics of the float model and of the exported file
  (as ``evaluate`` computes them), and their change.

The network is wrapped to take positional tensors and return a tuple, since exporters handle
dicts poorly. TorchScript comes from ``torch.jit.trace`` (``torch.jit.script`` rejects most
architectures); ONNX from ``torch.onnx.export``'s torch.export-based exporter, run with
onnxruntime. ``int8``: dynamic quantization of the Linear layers, int8 weights per output
channel (7 bits of them for ONNX: CPUs without VNNI saturate on 8) and activations quantized at
run time; embeddings, convolutions and the per-column layers of periodic numeric embeddings stay
float.
TorchScript uses ``torch.ao.quantization.quantize_dynamic``, ONNX onnxruntime's
``quantize_dynamic`` (MatMul and Gemm). A fine-tuned MiniLM is exported inside the network, its
token inputs with dynamic batch and sequence axes. ``--prune``: global magnitude pruning of the
Linear weights (see ``pruned``), before int8 when both are asked for."""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import prune

from mtl import paths
from mtl.config import Params
from mtl.engine.checkpoint import Bundle, versions
from mtl.engine.text import MINILM_TOKENIZER, MiniLMTokens, token_axis
from mtl.engine.trainer import TaskData, predict
from mtl.errors import UserError
from mtl.io import atomic_path, read_table, write_json
from mtl.stages.predict import CHUNK_ROWS
from mtl.stages.trained import check_labelled, load_model_file

FORMATS = ("torchscript", "onnx")
EXAMPLE_ROWS = 8  # rows of the test split traced through the network
DECODE = {"binary": "sigmoid(output[:, 0]) = probability of classes[1]",
          "multiclass": "softmax(output, dim=1) = probability of each of classes",
          "multilabel": "sigmoid(output) = probability of each of classes",
          "regression": "output[:, 0] * std + mean, in the target's units"}

Runner = Callable[[tuple[torch.Tensor, ...]], list[torch.Tensor]]


class Exported(nn.Module):
    """``model`` with positional tensor inputs (``inputs`` order) and a tuple of raw outputs,
    one per task (``tasks`` order)."""

    def __init__(self, model: nn.Module, inputs: list[str], tasks: list[str]):
        super().__init__()
        self.model, self.inputs, self.tasks = model, inputs, tasks

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = self.model(dict(zip(self.inputs, tensors)))
        return tuple(outputs[name] for name in self.tasks)


def run(params: Params, variant: str, seed: int | None, fmt: str, output: Path,
        int8: bool = False, prune_amount: float | None = None) -> None:
    if fmt not in FORMATS:
        raise UserError(f"--format: '{fmt}' is not one of {', '.join(FORMATS)}")
    if prune_amount is not None and not 0 < prune_amount < 1:
        raise UserError(f"--prune: {prune_amount} is not a fraction of the weights (between 0 and 1)")
    output = Path(output)
    bundle, model_sha256 = load_model_file(params, variant, seed)
    test_path = paths.split_path("test")
    table = read_table(test_path)
    check_labelled(table, test_path, params, bundle)
    if table.num_rows < 2:
        raise UserError(f"{test_path}: export needs at least 2 test rows to trace and measure")
    data = TaskData.from_table(table, bundle.preprocessor, bundle.tasks)
    names = list(data.inputs)
    network = bundle.model.eval()
    if prune_amount is not None:
        network = pruned(network, prune_amount)
    model = Exported(network, names, [t.name for t in bundle.tasks])
    example = tuple(v[:EXAMPLE_ROWS] for v in data.inputs.values())
    with atomic_path(output) as tmp, _quiet():
        if fmt == "onnx":
            runner = _onnx(model, example, names, tmp, int8)
        else:
            runner = _torchscript(model, example, tmp, int8)
        exported = _in_chunks(runner, tuple(data.inputs.values()))
        reference = predict(bundle.model, data.inputs)
        report = _compare(bundle, data, reference, dict(zip(model.tasks, exported)))
        described = _describe(bundle, data, fmt, int8, output.name)
        write_json(described | {"prune": prune_amount, "model_sha256": model_sha256},
                   f"{output}.json")
        write_json(report, f"{output}.metrics.json")
    print(_table(report))
    how = f"{' int8' if int8 else ''}{f' pruned {prune_amount:g}' if prune_amount else ''}"
    print(f"export@{variant}: {fmt}{how} -> {output}, {output}.json, {output}.metrics.json")


def pruned(model: nn.Module, amount: float) -> nn.Module:
    """A copy of ``model`` whose Linear weights of smallest magnitude, the fraction ``amount`` of
    all Linear weights ranked together, are zero for good: global magnitude pruning
    (``torch.nn.utils.prune.global_unstructured`` with ``L1Unstructured``, then ``prune.remove``).
    Han et al. 2015 ("Learning both Weights and Connections") retrain after pruning; this is
    one-shot, without retraining, so the metric change is the cost of pruning alone. Biases,
    embeddings and convolutions are kept."""
    model = copy.deepcopy(model)
    weights = [(m, "weight") for m in model.modules() if isinstance(m, nn.Linear)]
    prune.global_unstructured(weights, prune.L1Unstructured, amount=amount)
    for module, name in weights:
        prune.remove(module, name)
    return model


def _torchscript(model: Exported, example: tuple, path: Path, int8: bool) -> Runner:
    if int8:
        qconfig = torch.ao.quantization.per_channel_dynamic_qconfig
        model = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear: qconfig})
    with open(path, "wb") as file:  # a full disk is then an OSError, not a bare RuntimeError
        torch.jit.save(torch.jit.trace(model, example), file)
    loaded = torch.jit.load(str(path))
    return lambda tensors: list(loaded(*tensors))


def _onnx(model: Exported, example: tuple, names: list[str], path: Path, int8: bool) -> Runner:
    with needs_extra("--format onnx"):
        from onnxruntime.quantization import QuantType, quantize_dynamic
    axes = {axis: torch.export.Dim(axis) for axis in ["batch", *map(token_axis, names)] if axis}
    shapes = tuple({0: axes["batch"]} | ({1: axes[token_axis(name)]} if token_axis(name) else {})
                   for name in names)
    with tempfile.TemporaryDirectory() as scratch:
        fp32 = Path(scratch) / "fp32.onnx" if int8 else path
        torch.onnx.export(model, example, str(fp32), input_names=[f"input_{n}" for n in names],
                          output_names=[f"output_{t}" for t in model.tasks],
                          dynamic_shapes={"tensors": shapes}, external_data=False, verbose=False)
        if int8:
            # reduce_range: 7-bit weights, so that the u8 x s8 products of CPUs without VNNI
            # (AVX2 only) do not saturate; the file runs wherever it is served
            quantize_dynamic(fp32, path, weight_type=QuantType.QInt8, per_channel=True,
                             reduce_range=True, op_types_to_quantize=["MatMul", "Gemm"],
                             nodes_to_exclude=_batched_matmuls(fp32))
    return onnx_runner(str(path), names)


def _batched_matmuls(path: Path) -> list[str]:
    """The MatMul nodes of the ONNX file ``path`` whose weight is not a matrix (the per-column
    layers of periodic embeddings): onnxruntime's per-channel int8 cannot take them, and
    TorchScript's int8 keeps them float too (they are not ``nn.Linear``)."""
    import onnx

    graph = onnx.load(str(path)).graph
    ranks = {t.name: len(t.dims) for t in graph.initializer}
    return [n.name for n in graph.node
            if n.op_type == "MatMul" and any(ranks.get(i, 2) > 2 for i in n.input)]


def onnx_runner(model: str | bytes, names: list[str], threads: int = 0) -> Runner:
    """An exported ONNX file (its path or its bytes), run with onnxruntime on the CPU with
    ``threads`` threads (0: onnxruntime's default); ``names``: the input keys in the file's
    order. Needs ``onnxruntime`` (see ``needs_extra``)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    return lambda tensors: [torch.from_numpy(out) for out in session.run(
        None, {f"input_{n}": t.numpy() for n, t in zip(names, tensors)})]


@contextlib.contextmanager
def needs_extra(option: str) -> Iterator[None]:
    """One line naming ``option`` and the optional extra for a missing ONNX package."""
    try:
        yield
    except ImportError:
        raise UserError(f"{option} needs the optional extra 'export' "
                        "(pip install -c constraints.txt -e '.[export]')") from None


def _in_chunks(runner: Runner, tensors: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    n = len(tensors[0])
    chunks = [runner(tuple(t[i:i + CHUNK_ROWS] for t in tensors)) for i in range(0, n, CHUNK_ROWS)]
    return [torch.cat(parts) for parts in zip(*chunks)]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Hide the exporters' chatter: torch.jit's and torch.ao.quantization's deprecation notices,
    torch.onnx's note on missing torchvision ops, onnxruntime's pre-processing advice."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript", "")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)


def _compare(bundle: Bundle, data: TaskData, reference: dict[str, torch.Tensor],
             exported: dict[str, torch.Tensor]) -> dict:
    report: dict = {"float": {}, "exported": {}, "change": {}, "max_abs_output_diff": {}}
    for task in bundle.tasks:
        y, mask = data.targets[task.name], data.masks[task.name]
        before, after = (task.metrics(out[task.name], y, mask) for out in (reference, exported))
        report["float"][task.name] = _rounded(before)
        report["exported"][task.name] = _rounded(after)
        report["change"][task.name] = _rounded({k: after[k] - before[k] for k in before})
        diff = (exported[task.name].float() - reference[task.name]).abs().max()
        report["max_abs_output_diff"][task.name] = float(diff)
    return report


def _rounded(values: dict[str, float]) -> dict[str, float | None]:
    return {k: (round(v, 6) if math.isfinite(v) else None) for k, v in values.items()}


def _describe(bundle: Bundle, data: TaskData, fmt: str, int8: bool, file: str) -> dict:
    """What a user of the exported file needs: input and output layout, decoding, preprocessing."""
    def dims(name: str, shape: torch.Size) -> list:
        return ["batch", *([token_axis(name)] if token_axis(name) else shape[1:])]

    inputs = [{"name": f"input_{k}", "key": k, "dtype": str(v.dtype).removeprefix("torch."),
               "shape": dims(k, v.shape)} for k, v in data.inputs.items()]
    outputs = [{"name": f"output_{t.name}", "task": t.name, "kind": t.kind,
                "shape": ["batch", t.out_dim], "decode": DECODE[t.kind]}
               | ({"mean": t.mean, "std": t.std} if t.kind == "regression" else {"classes": list(t.classes)})
               for t in bundle.tasks]
    tokens = isinstance(bundle.preprocessor.text, MiniLMTokens)
    return {"file": file, "format": fmt, "int8": int8, "arch": bundle.arch,
            "variant": bundle.info.get("variant"), "seed": bundle.info.get("seed"),
            "inputs": inputs, "outputs": outputs,
            "preprocessing": bundle.preprocessor.state(), "versions": versions()} | (
        {"tokenizer": MINILM_TOKENIZER} if tokens else {})


def _table(report: dict) -> str:
    lines = [f"{'task':<16} {'metric':<10} {'float':>10} {'exported':>10} {'change':>10}"]
    for task, values in report["float"].items():
        for key, before in values.items():
            after, change = report["exported"][task][key], report["change"][task][key]
            lines.append(f"{task:<16} {key:<10} {_num(before):>10} {_num(after):>10} {_num(change):>10}")
    return "\n".join(lines)


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
