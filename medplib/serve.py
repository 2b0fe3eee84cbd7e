"""Serving: the MLflow pyfunc wrapper around a saved MedPLIB folder, and `predict` for one request.

Request (one row per question): `image` (a PNG path or base64 PNG), `question`, and optionally one pixel prompt:
`point` "x,y", `box` "x1,y1,x2,y2" or `region` (base64 PNG mask, or a path). A question without `<region>`
gets one appended when a prompt is given. Response: `answer` and `masks`, a list of base64 PNGs (one per `<SEG>`).
"""
from __future__ import annotations

import base64
import io
import logging
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

REQUEST_COLUMNS = ("image", "question", "point", "box", "region")
MAX_REQUEST_PIXELS = 4096 * 4096


class RequestError(ValueError):
    """A prediction request that cannot be answered; names the row, field and value."""


def _decode_png(value: str, row: int, field: str) -> np.ndarray:
    from medplib.data.images import ImageReadError, read_image

    if not isinstance(value, str) or not value:
        raise RequestError(f"Request row {row}: field '{field}' must be a PNG path or base64 PNG, got {value!r}")
    try:
        if len(value) < 1024 and Path(value).is_file():
            return read_image(Path(value), MAX_REQUEST_PIXELS)
        raw = base64.b64decode(value, validate=True)
    except (ValueError, OSError):
        raise RequestError(f"Request row {row}: field '{field}' is neither an existing file nor base64 "
                           f"({value[:40]!r}…)") from None
    except ImageReadError as e:
        raise RequestError(f"Request row {row}: field '{field}' ({value}): {e}") from None
    try:
        return read_image(io.BytesIO(raw), MAX_REQUEST_PIXELS)  # type: ignore[arg-type]
    except ImageReadError as e:
        raise RequestError(f"Request row {row}: field '{field}': {e}") from None


def encode_png(mask: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(mask).astype(np.uint8) * 255 if mask.dtype == bool else mask).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _ints(value: Any, n: int, row: int, field: str) -> list[int]:
    parts = value if isinstance(value, (list, tuple)) else str(value).split(",")
    try:
        nums = [int(round(float(p))) for p in parts]
    except (TypeError, ValueError):
        nums = []
    if len(nums) != n:
        raise RequestError(f"Request row {row}: field '{field}' = {value!r} must be {n} comma-separated numbers")
    return nums


def parse_request(row: dict, i: int = 0) -> tuple[np.ndarray, str, list[np.ndarray]]:
    """(image, question, region masks) of one request row, with clear errors for bad fields."""
    from medplib.model.prompts import PromptError, box_prompt_mask, freeform_prompt_mask, point_prompt_mask

    unknown = sorted(k for k in row if k not in REQUEST_COLUMNS and row[k] is not None)
    if unknown:
        raise RequestError(f"Request row {i}: unknown field '{unknown[0]}'; fields are {list(REQUEST_COLUMNS)}")
    if "image" not in row or row["image"] is None:
        raise RequestError(f"Request row {i}: field 'image' is missing")
    question = row.get("question")
    if not isinstance(question, str) or not question.strip():
        raise RequestError(f"Request row {i}: field 'question' must be non-empty text, got {question!r}")
    image = _decode_png(row["image"], i, "image")
    h, w = image.shape[:2]
    given = [k for k in ("point", "box", "region") if _present(row.get(k))]
    if len(given) > 1:
        raise RequestError(f"Request row {i}: give at most one pixel prompt, got {given}")
    regions: list[np.ndarray] = []
    try:
        if given == ["point"]:
            x, y = _ints(row["point"], 2, i, "point")
            regions.append(point_prompt_mask(x, y, h, w))
        elif given == ["box"]:
            regions.append(box_prompt_mask(*_ints(row["box"], 4, i, "box"), h, w))
        elif given == ["region"]:
            regions.append(freeform_prompt_mask(_decode_png(row["region"], i, "region"), h, w))
    except PromptError as e:
        raise RequestError(f"Request row {i}: field '{given[0]}': {e}") from None
    if regions and "<region>" not in question:
        question = question.rstrip() + " <region>"
    return image, question, regions


def _present(v: Any) -> bool:
    return v is not None and not (isinstance(v, float) and np.isnan(v)) and v != ""



class MedPLIBPyfunc(mlflow.pyfunc.PythonModel):
    """The served model: loads the weights folder logged as the `weights` artifact."""

    def load_context(self, context) -> None:
        import torch

        from medplib.model import MedPLIB

        torch.set_grad_enabled(False)
        self.model = MedPLIB.from_pretrained(context.artifacts["weights"]).eval()

    def predict(self, context, model_input, params: dict | None = None):
        import pandas as pd

        rows = model_input.to_dict(orient="records") if hasattr(model_input, "to_dict") else list(model_input)
        return pd.DataFrame(answer_rows(self.model, rows, **(params or {})))


def answer_rows(model, rows: list[dict], max_new_tokens: int = 24) -> list[dict]:
    """Answer request rows with a loaded MedPLIB model: [{"answer": str, "masks": [base64 PNG, ...]}]."""
    parsed = [parse_request(r, i) for i, r in enumerate(rows)]
    outs = model.generate([p[0] for p in parsed], [p[1] for p in parsed], [p[2] for p in parsed],
                          max_new_tokens=int(max_new_tokens))
    return [{"answer": o.text, "masks": [encode_png(m) for m in o.masks]} for o in outs]


PIP_REQUIREMENTS = ["torch==2.13.0", "transformers==5.23.0", "tokenizers==0.23.3", "safetensors==0.8.0",
                    "numpy==2.4.6", "pandas==3.1.1", "pillow==13.0.0", "mlflow==3.17.2"]


def log_pyfunc(model_dir: Path, artifact_path: str = "medplib", example_image: np.ndarray | None = None):
    """Log a saved MedPLIB folder as an MLflow pyfunc in the active run; returns the ModelInfo."""
    import mlflow
    import pandas as pd
    from mlflow.models import infer_signature

    example = pd.DataFrame([{"image": encode_png(example_image if example_image is not None
                                                 else np.zeros((64, 64), np.uint8)),
                             "question": "What is in <region>?", "point": "32,32", "box": None, "region": None}])
    output = pd.DataFrame([{"answer": "It is the liver.", "masks": [encode_png(np.zeros((64, 64), bool))]}])
    signature = infer_signature(example.astype(object), output, params={"max_new_tokens": 24})
    code = [str(Path(__file__).resolve().parent)]  # the medplib package travels with the model
    return mlflow.pyfunc.log_model(name=artifact_path, python_model=MedPLIBPyfunc(),
                                   artifacts={"weights": str(model_dir)}, signature=signature,
                                   input_example=example, pip_requirements=PIP_REQUIREMENTS, code_paths=code)
