"""The body of ``POST /predict`` and of its answer, built from the served model's columns: one
field per feature column (all required, each nullable; no other field), and one per output
column. Validation is strict (a number for a numeric column, text for a text column; a whole
number is also taken for a category, as ``"1"``), and its errors become one status and message."""

from __future__ import annotations

import base64
from typing import Annotated, Any

import pyarrow as pa
from pydantic import BeforeValidator, ConfigDict, Field, TypeAdapter, ValidationError
from typing_extensions import TypedDict

from mtl.engine.checkpoint import Bundle
from mtl.stages.common import WRITTEN_TYPES
from mtl.stages.predict import Columns
from mtl.stages.trained import feature_columns, model_kinds

STRICT = ConfigDict(strict=True, extra="forbid")


def _category(value: Any) -> Any:
    """A whole number as the text ingest makes of it (1 -> "1"); anything else as it is."""
    return str(value) if type(value) is int else value


def _image(shape: tuple[int, int]) -> Any:
    """Base64 text of H x W grey-scale bytes, row-major (as ingest stores an image)."""
    def decoded(value: Any) -> Any:
        if not isinstance(value, str):
            return value  # the str schema rejects it
        pixels = base64.b64decode(value, validate=True)
        if len(pixels) != shape[0] * shape[1]:
            raise ValueError(f"{len(pixels)} bytes, not the {shape[0]} x {shape[1]} of an image")
        return pixels
    return Annotated[bytes, BeforeValidator(decoded, json_schema_input_type=str)]


def field_types(bundle: Bundle) -> dict[str, Any]:
    """Each feature column's type in a request row."""
    p = bundle.preprocessor
    kinds = model_kinds(bundle)
    types = {"numeric": float, "text": str,
             "categorical": Annotated[str, BeforeValidator(_category, json_schema_input_type=str | int)],
             "image": _image(p.image.shape) if p.image else None}
    return {name: types[kinds[name]] | None for name in feature_columns(p)}


def request_type(bundle: Bundle, max_rows: int) -> TypeAdapter:
    """``{"rows": [row, ...]}`` with 1 to ``max_rows`` rows."""
    row = TypedDict("Row", field_types(bundle))
    row.__pydantic_config__ = STRICT
    body = TypedDict("PredictRequest", {
        "rows": Annotated[list[row], Field(min_length=1, max_length=max_rows)]})
    body.__pydantic_config__ = STRICT
    return TypeAdapter(body)


def response_type(outputs: dict[str, type]) -> TypeAdapter:
    """``{"predictions": [one object of the output columns per row]}``."""
    prediction = TypedDict("Prediction", outputs)
    return TypeAdapter(TypedDict("PredictResponse", {"predictions": list[prediction]}))


def arrow_schema(bundle: Bundle) -> pa.Schema:
    """The feature columns as ingest writes them: what ``mtl predict`` reads from a file."""
    kinds = model_kinds(bundle)
    return pa.schema([(name, WRITTEN_TYPES[kinds[name]]) for name in feature_columns(bundle.preprocessor)])


def rows_of(columns: Columns) -> list[dict]:
    """Output columns -> one dict per row."""
    values = [c.to_pylist() if isinstance(c, pa.Array) else c.tolist() for c in columns.values()]
    return [dict(zip(columns, row)) for row in zip(*values)]


def problem(exc: ValidationError) -> tuple[int, dict]:
    """The status and body of a request that ``request_type`` refused: 400 for a body that is
    not JSON, 413 for too many rows, 422 otherwise. ``message`` names the first problem's place
    (``rows[2].bill_length_mm``); ``detail`` lists them all, as FastAPI does."""
    errors = exc.errors(include_url=False, include_input=False, include_context=False)
    first = errors[0]
    status = {"json_invalid": 400}.get(first["type"], 422)
    if first["type"] == "too_long" and first["loc"] == ("rows",):
        status = 413
    where = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in first["loc"])
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    detail = [{"loc": ["body", *e["loc"]], "msg": e["msg"], "type": e["type"]} for e in errors]
    return status, {"message": f"{where.lstrip('.') or 'body'}: {first['msg']}{more}", "detail": detail}
