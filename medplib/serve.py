"""Serving: the MLflow pyfunc wrapper around a saved MedPLIB folder, and `predict` for one request.

Request (one row per question): `image` (a PNG path or base64 PNG), `question`, and optionally one pixel prompt:
`point` "x,y", `box` "x1,y1,x2,y2" or `region` (base64 PNG mask, or a path). A question without `<region>`
gets one appended when a prompt is given. Response: `answer` and `masks`, a list of base64 PNGs (one per `<SEG>`).

A model is named by a saved MedPLIB folder, a pyfunc folder, or an MLflow URI (`models:/medplib@champion`,
`models:/medplib/3`, `runs:/<run>/medplib`); `model_folder` turns any of them into a saved MedPLIB folder.
`served` runs `mlflow models serve --env-manager local` on 127.0.0.1; `ScoringClient` / `invoke` talk to it.
"""
from __future__ import annotations

import base64
import io
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import mlflow.pyfunc
import numpy as np
import pandas as pd
from PIL import Image

if TYPE_CHECKING:
    from medplib.config import TrackingConfig
    from medplib.model import MedPLIB

log = logging.getLogger(__name__)

REQUEST_COLUMNS = ("image", "question", "point", "box", "region", "examples", "example_style")
DEVICE_ENV = "MEDPLIB_DEVICE"  # where a served model runs (auto, cpu, cuda, cuda:N), read by the served pyfunc only
MAX_REQUEST_PIXELS = 4096 * 4096


class RequestError(ValueError):
    """A prediction request that cannot be answered; names the row, field and value."""


def _decode_png(value: str, row: int, field: str) -> np.ndarray:
    from medplib.data.images import ImageReadError, read_image

    if not isinstance(value, str) or not value:
        raise RequestError(f"Request row {row}: field '{field}' must be a PNG path or base64 PNG, got {value!r}")
    if len(value) < 1024 and _is_file(value):
        try:
            return read_image(Path(value), MAX_REQUEST_PIXELS)
        except ImageReadError as e:
            raise RequestError(f"Request row {row}: field '{field}' ({value}): {e}") from None
    try:
        raw = base64.b64decode(value, validate=True)
    except ValueError:
        raise RequestError(f"Request row {row}: field '{field}' is neither an existing file nor base64 "
                           f"({value[:40]!r}…)") from None
    try:
        return read_image(io.BytesIO(raw), MAX_REQUEST_PIXELS)  # type: ignore[arg-type]
    except ImageReadError as e:
        raise RequestError(f"Request row {row}: field '{field}': {e}") from None


def _is_file(value: str) -> bool:
    try:
        return Path(value).is_file()
    except OSError:  # a base64 PNG longer than a file name may be
        return False


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


def parse_request(row: dict, i: int = 0, point_side: int | None = None) -> tuple[np.ndarray, str, list[np.ndarray]]:
    """(image, question, region masks) of one request row, with clear errors for bad fields. A point becomes a square
    of `point_side` px at 336 px (the model config's `point_prompt_size`; default MedPLIB's 41)."""
    from medplib.model.prompts import (
        POINT_SIDE_AT_336, PromptError, box_prompt_mask, freeform_prompt_mask, point_prompt_mask,
    )

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
            regions.append(point_prompt_mask(x, y, h, w, point_side or POINT_SIDE_AT_336))
        elif given == ["box"]:
            regions.append(box_prompt_mask(*_ints(row["box"], 4, i, "box"), h, w))
        elif given == ["region"]:
            regions.append(freeform_prompt_mask(_decode_png(row["region"], i, "region"), h, w))
    except PromptError as e:
        raise RequestError(f"Request row {i}: field '{given[0]}': {e}") from None
    if regions and "<region>" not in question:
        question = question.rstrip() + " <region>"
    return image, question, regions


def parse_examples(row: dict, i: int,
                   question: str) -> tuple[str, list[np.ndarray], list[tuple[np.ndarray, np.ndarray]]]:
    """In-context examples of a request row: `examples`, a JSON list (or list) of up to 3 {"image", "mask"} (PNG paths
    or base64 PNG), shown as `example_style` says ("overlay", default: the mask in blue over its image; "separate":
    the mask as an image of its own). Returns the question with a placeholder per shown image and the query's
    (medplib.tasks.incontext), the images to show, and the (image, bool mask) pairs (for a mask decoder that reads
    examples); none given: the question as it was, no images and no pairs."""
    import json

    from medplib.tasks.incontext import MAX_EXAMPLES, STYLES, prompt_with_examples, show_examples

    given = row.get("examples")
    if not _present(given):
        return question, [], []
    if isinstance(given, str):
        try:
            given = json.loads(given)
        except json.JSONDecodeError as e:
            raise RequestError(f"Request row {i}: field 'examples' is not JSON ({e.msg}): give a list of "
                               '{"image": PNG, "mask": PNG}') from None
    if not isinstance(given, list) or not all(isinstance(e, dict) and {"image", "mask"} <= set(e) for e in given):
        raise RequestError(f"Request row {i}: field 'examples' must be a list of {{\"image\": PNG, \"mask\": PNG}}, "
                           f"got {str(given)[:80]!r}")
    if len(given) > MAX_EXAMPLES:
        raise RequestError(f"Request row {i}: field 'examples' has {len(given)} examples; at most {MAX_EXAMPLES}")
    style = row.get("example_style") if _present(row.get("example_style")) else "overlay"
    if style not in STYLES:
        raise RequestError(f"Request row {i}: field 'example_style' = {style!r}: use one of {sorted(STYLES)}")
    pairs = []
    for k, example in enumerate(given):
        image = _decode_png(example["image"], i, f"examples[{k}].image")
        mask = _decode_png(example["mask"], i, f"examples[{k}].mask")
        if mask.shape[:2] != image.shape[:2]:
            raise RequestError(f"Request row {i}: field 'examples[{k}].mask' is {mask.shape[1]}x{mask.shape[0]} but "
                               f"its image is {image.shape[1]}x{image.shape[0]}")
        pairs.append((image, (mask if mask.ndim == 2 else mask[..., 0]) > 0))
    if "<image>" in question:
        raise RequestError(f"Request row {i}: field 'question' has <image> placeholders; with examples the prompt "
                           "places them itself")
    return prompt_with_examples(question, len(pairs), style), show_examples(pairs, style), pairs


def _present(v: Any) -> bool:
    return v is not None and not (isinstance(v, float) and np.isnan(v)) and v != ""


class MedPLIBPyfunc(mlflow.pyfunc.PythonModel):
    """The served model: loads the weights folder logged as the `weights` artifact."""

    def load_context(self, context) -> None:
        # No torch.set_grad_enabled(False) here: it would switch autograd off for the whole loading thread
        # (a training process that loads the pyfunc); generate() runs under no_grad already.
        # The serving process is an entry of its own: the device comes from the load's model_config
        # (mlflow.pyfunc.load_model(uri, model_config={"device": "cpu"})), else $MEDPLIB_DEVICE, else auto.
        device = (getattr(context, "model_config", None) or {}).get("device") or os.environ.get(DEVICE_ENV, "auto")
        self.model = load_model(context.artifacts["weights"], device=device)

    # The pandas hint keeps MLflow from asking for type hints; the logged signature does the validation.
    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> list[dict]:
        if isinstance(model_input, pd.DataFrame):
            # ~3x faster than to_dict(orient="records"); the served call pays every millisecond (serve_overhead)
            columns = list(model_input.columns)
            rows = [dict(zip(columns, values)) for values in model_input.to_numpy(dtype=object).tolist()]
        else:
            rows = list(model_input)
        # Records, not a DataFrame: the scoring server writes the same JSON, without building one more frame.
        return answer_rows(self.model, rows, **(params or {}))


def answer_rows(model, rows: list[dict], max_new_tokens: int = 24) -> list[dict]:
    """Answer request rows with a loaded MedPLIB model: [{"answer": str, "masks": [base64 PNG, ...]}]."""
    from medplib.model.family import generate_takes

    side = getattr(getattr(model, "config", None), "point_prompt_size", None)  # a family without pixel prompts: None
    parsed = [parse_request(r, i, side) for i, r in enumerate(rows)]
    shown = [parse_examples(r, i, q) for i, (r, (_, q, _)) in enumerate(zip(rows, parsed))]
    examples = {"contexts": [c for _, c, _ in shown]} if any(c for _, c, _ in shown) else {}
    if examples and not generate_takes(model, "contexts"):
        raise RequestError(f"This model ({type(model).__name__}) takes no in-context examples")
    if examples and generate_takes(model, "examples"):  # the pairs themselves, for a mask decoder that reads them
        examples["examples"] = [pairs for _, _, pairs in shown]
    outs = model.generate([p[0] for p in parsed], [q for q, _, _ in shown], [p[2] for p in parsed],
                          max_new_tokens=int(max_new_tokens), **examples)
    return [{"answer": o.text, "masks": [encode_png(m) for m in o.masks]} for o in outs]


PIP_REQUIREMENTS = ["torch==2.13.0", "transformers==5.23.0", "tokenizers==0.23.3", "safetensors==0.8.0",
                    "numpy==2.4.6", "pandas==3.1.1", "pillow==13.0.0", "mlflow==3.17.2"]


def log_pyfunc(model_dir: Path, artifact_path: str = "medplib", example_image: np.ndarray | None = None):
    """Log a saved model folder (of any family: one request and response contract) as an MLflow pyfunc in the
    active run, with its family's example request; returns the ModelInfo."""
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import Array

    from medplib.model.family import family_of

    image = example_image if example_image is not None else np.zeros((64, 64), np.uint8)
    h, w = image.shape[:2]
    request = (family_of(model_dir).example_request
               or {"question": "What is in <region>?", "point": f"{w // 2},{h // 2}"})
    example = pd.DataFrame([{"image": encode_png(image), **request}])
    # Written out, not inferred from the example: the pixel prompts are optional columns.
    signature = ModelSignature(
        inputs=Schema([ColSpec("string", "image"), ColSpec("string", "question"),
                       *(ColSpec("string", k, required=False)
                         for k in ("point", "box", "region", "examples", "example_style"))]),
        outputs=Schema([ColSpec("string", "answer"), ColSpec(Array("string"), "masks")]),
        params=ParamSchema([ParamSpec("max_new_tokens", "long", 24)]))
    code = [str(Path(__file__).resolve().parent)]  # the medplib package travels with the model
    # Models from code: MLflow stores the entry file's source instead of cloudpickling a Python object.
    entry = str(Path(__file__).resolve().parent / "pyfunc_entry.py")
    return mlflow.pyfunc.log_model(name=artifact_path, python_model=entry,
                                   artifacts={"weights": str(model_dir)}, signature=signature,
                                   input_example=example, pip_requirements=PIP_REQUIREMENTS, code_paths=code)


# ---- models by URI or folder ---------------------------------------------------------------------------------

MODEL_URI_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/", "s3://", "gs://", "file:/")


def _medplib_folder(folder: Path) -> Path | None:
    """The saved MedPLIB folder in `folder`: itself, or the `weights` artifact of a pyfunc folder."""
    import yaml

    if (folder / "config.json").is_file():
        return folder
    mlmodel = folder / "MLmodel"
    if mlmodel.is_file():
        flavor = (yaml.safe_load(mlmodel.read_text(encoding="utf-8")).get("flavors") or {}).get("python_function", {})
        weights = (flavor.get("artifacts") or {}).get("weights", {}).get("path")
        if weights and (folder / weights / "config.json").is_file():
            return folder / weights
    return None


@contextmanager
def model_folder(model: str | Path, tracking: "TrackingConfig | None" = None) -> Iterator[Path]:
    """A saved MedPLIB folder for `model` (folder or MLflow URI); URIs are downloaded to a temporary folder
    that is removed on exit. `tracking` gives the tracking and registry URIs to resolve them against."""
    text = str(model)
    if not text.startswith(MODEL_URI_SCHEMES):
        folder = Path(text).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"Model '{text}' is neither a folder nor an MLflow URI (models:/NAME@ALIAS, "
                                    "models:/NAME/VERSION, runs:/RUN_ID/PATH)")
        found = _medplib_folder(folder)
        if found is None:
            raise ValueError(f"Model folder '{text}' holds neither a saved MedPLIB model (config.json) nor an "
                             "MLflow pyfunc with a 'weights' artifact (MLmodel)")
        yield found
        return

    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    from medplib.registry import use_tracking

    with tempfile.TemporaryDirectory(prefix="medplib-model-") as tmp:
        try:
            # MLflow resolves `models:/NAME@ALIAS` with the global registry URI, whatever is passed here.
            with use_tracking(tracking) if tracking else nullcontext():
                local = mlflow.artifacts.download_artifacts(artifact_uri=text, dst_path=tmp)
        except MlflowException as e:
            where = f" in {tracking.registry_uri}" if tracking else ""
            raise ValueError(f"Model '{text}' cannot be fetched{where}: {e.message}") from None
        found = _medplib_folder(Path(local))
        if found is None:
            raise ValueError(f"Model '{text}' is not a MedPLIB model: no config.json and no pyfunc 'weights' "
                             "artifact in what it points at")
        yield found


def load_model(model: str | Path, tracking: "TrackingConfig | None" = None, family: str | None = None,
               device: str = "auto") -> "MedPLIB":
    """The model in eval mode from a folder or an MLflow URI (see `model_folder`), of whatever family the saved
    folder declares, on `device` (`medplib.device.resolve_device`: auto, cpu, cuda[:N]; bf16 on a GPU); with
    `family`, the folder must be that family's (a clear error otherwise)."""
    from medplib.device import resolve_device
    from medplib.model import load_pretrained

    placement = resolve_device(device)  # a missing GPU fails before anything is downloaded
    with model_folder(model, tracking) as folder:
        loaded = placement.apply(load_pretrained(folder, family)).eval()
    log.info("%s loaded on %s", model, placement)
    return loaded


def predict(model: "MedPLIB", image: str, question: str, *, point: str | None = None, box: str | None = None,
            region: str | None = None, examples: list[dict] | None = None, example_style: str | None = None,
            max_new_tokens: int = 24) -> dict:
    """Answer one request as the served pyfunc does: `{"answer": str, "masks": [base64 PNG, ...]}`."""
    row = {"image": image, "question": question, "point": point, "box": box, "region": region,
           "examples": examples, "example_style": example_style}
    return answer_rows(model, [row], max_new_tokens=max_new_tokens)[0]


# ---- a local scoring server ------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def served(model_uri: str, tracking: "TrackingConfig | None" = None, port: int | None = None,
           startup_timeout: float = 180.0, env: dict[str, str] | None = None,
           log_file: Path | None = None) -> Iterator[str]:
    """Run `mlflow models serve -m MODEL_URI --env-manager local` on 127.0.0.1; yield its base URL once `/ping`
    answers; stop the server (its whole process group) on exit."""
    port = port or free_port()
    bin_dir = str(Path(sys.executable).parent)  # the scoring server runs `uvicorn` from PATH
    child_env = {**(env or {}), "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
    if tracking is not None:
        child_env |= {"MLFLOW_TRACKING_URI": tracking.tracking_uri, "MLFLOW_REGISTRY_URI": tracking.registry_uri}
    cmd = [str(Path(bin_dir) / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local",
           "--host", "127.0.0.1", "--port", str(port)]
    with scoring_server(cmd, f"http://127.0.0.1:{port}", child_env, startup_timeout=startup_timeout,
                        log_file=log_file) as url:
        log.info("serving %s at %s", model_uri, url)
        yield url


@contextmanager
def scoring_server(cmd: list[str], url: str, env: dict[str, str] | None = None, cwd: Path | None = None,
                   startup_timeout: float = 180.0, log_file: Path | None = None) -> Iterator[str]:
    """Run a command that starts a scoring server at `url` (`env` over this process's environment); yield `url` once
    its `/ping` answers; stop the command's whole process group on exit."""
    out = open(log_file, "w+b") if log_file else tempfile.TemporaryFile()
    # Its own session: mlflow starts uvicorn as a child, and the whole group is stopped together.
    proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if proc.poll() is not None:
                out.seek(0)
                tail = out.read()[-3000:].decode(errors="replace")
                raise RuntimeError(f"`{' '.join(cmd)}` exited with {proc.returncode} before answering /ping:\n{tail}")
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"`{' '.join(cmd)}` did not answer {url}/ping within {startup_timeout:.0f} s")
            time.sleep(0.5)
        yield url
    finally:
        _stop(proc)
        out.close()


def _stop(proc: subprocess.Popen, grace: float = 15.0) -> None:
    """Stop the server's whole process group (mlflow runs uvicorn as a child): SIGTERM, then SIGKILL whatever is
    still there after `grace` seconds. Returns once no member is left, so the port is free."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        if _group_gone(proc, grace):
            break
    proc.wait(timeout=grace)


def _group_gone(proc: subprocess.Popen, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc.poll()  # reap our direct child, or it would stay in the group as a zombie
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


class ScoringClient:
    """A client of a scoring server's /invocations that keeps its HTTP connection open between requests."""

    def __init__(self, url: str, timeout: float = 120.0):
        import http.client
        import urllib.parse

        parsed = urllib.parse.urlsplit(url)
        self.url = url.rstrip("/")
        self._conn = http.client.HTTPConnection(parsed.hostname, parsed.port or 80, timeout=timeout)

    def invoke(self, rows: list[dict], params: dict | None = None) -> list[dict]:
        """POST request rows (pandas `dataframe_split`); returns the predictions, one dict per row."""
        import json

        columns = [c for c in REQUEST_COLUMNS if any(c in r for r in rows)]
        columns += sorted({k for r in rows for k in r} - set(columns))  # the server names unknown fields
        body = {"dataframe_split": {"columns": columns, "data": [[r.get(c) for c in columns] for r in rows]}}
        if params:
            body["params"] = params
        try:
            self._conn.request("POST", "/invocations", body=json.dumps(body).encode(),
                               headers={"Content-Type": "application/json"})
            response = self._conn.getresponse()
            text = response.read().decode(errors="replace")
        except OSError:
            self._conn.close()  # the next request reconnects
            raise
        if response.status == 200:
            return json.loads(text)["predictions"]
        try:  # the scoring server wraps our error: its last traceback line is the message a person needs
            err = json.loads(text)
            last = (err.get("stack_trace") or "").strip().splitlines()
            text = f"{err.get('message', '')} ({last[-1] if last else 'no traceback'})"
        except (ValueError, AttributeError):
            pass
        raise RuntimeError(f"{self.url}/invocations answered {response.status}: {text[:2000]}")

    def close(self) -> None:
        self._conn.close()


def invoke(url: str, rows: list[dict], params: dict | None = None, timeout: float = 120.0) -> list[dict]:
    """One request to a scoring server's /invocations on a fresh connection (see ScoringClient)."""
    client = ScoringClient(url, timeout)
    try:
        return client.invoke(rows, params)
    finally:
        client.close()
