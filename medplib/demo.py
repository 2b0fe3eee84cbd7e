"""`medplib demo`: a page on 127.0.0.1 to draw a point, a box or a free-form shape on a medical image, ask, and see
the answer, the grounded mask and any boxes the answer names, from a registered model (alias or version) or a
saved model folder.

The page (`PAGE`, plain HTML and a canvas, no front-end build) talks to three JSON endpoints:
- `GET /api/models`: the models to choose from (the registry's aliases and versions, and `--model`'s choice);
- `GET /api/samples`, `GET /api/samples/{i}.png`: a few test-split images per modality of the project's data/;
- `POST /api/ask`: `{model, image | sample, task, text, point | box | region}` →
  `{answer, question, masks, overlay, boxes, seconds}`.
  The prompt fields are the served model's (medplib.serve: `point` "x,y", `box` "x1,y1,x2,y2", `region` a base64
  PNG mask); `task` is "ask" or a registered task offering itself to the demo (`Task.demo`), whose template may
  name `{box}` (the drawn box written as box text on Med-GRIT's grid, not a pixel prompt) or `{text}` (the page's
  text field: a question, a structure's name, a clinical note).
Bad requests answer 400 with `{"error": ...}` naming the field and value; the page shows it, never a traceback.
"""
from __future__ import annotations

import base64
import io
import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from PIL import Image
from starlette.concurrency import run_in_threadpool

from medplib.data import boxes
from medplib.serve import RequestError, encode_png, parse_examples, parse_request

if TYPE_CHECKING:
    from medplib.registry import Registry

log = logging.getLogger(__name__)

ASK = ("Ask (with an optional point, box or shape as <region>)", "{text}")


def demo_tasks() -> dict[str, tuple[str, str]]:
    """What the page offers: a free question ("ask"), then every registered task's `demo` (label, question template;
    `{text}` the page's text field, `{box}` the drawn box as Med-GRIT box text)."""
    from medplib import tasks

    return {"ask": ASK} | {t.name: t.demo for t in tasks.all_tasks() if t.demo}


SAMPLES_PER_MODALITY = 2
OVERLAY_RGB, OVERLAY_ALPHA = (255, 40, 40), 0.5


class DemoError(ValueError):
    """A demo request that cannot be answered; the message names the field and value."""


@dataclass
class Sample:
    modality: str
    path: Path  # the image file
    record_id: str


def find_samples(data_dir: Path, per_modality: int = SAMPLES_PER_MODALITY) -> list[Sample]:
    """The first `per_modality` test images of each modality in data/ (records.jsonl), in a stable order; none when
    there is no dataset yet (the page still takes uploads)."""
    path = Path(data_dir) / "records.jsonl"
    if not path.is_file():
        return []
    seen: dict[str, list[Sample]] = {}
    images: set[str] = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        r = json.loads(line)
        if r.get("split") != "test" or r["image"] in images:
            continue
        chosen = seen.setdefault(r["modality"], [])
        if len(chosen) < per_modality:
            chosen.append(Sample(r["modality"], Path(data_dir) / r["image"], r["id"]))
            images.add(r["image"])
    return [s for modality in sorted(seen) for s in seen[modality]]


def build_question(task: str, text: str, box: Any, image_shape: tuple[int, ...]) -> tuple[str, bool]:
    """The question a task asks, and whether the drawn box still goes to the model as a pixel prompt (False when
    the template wrote it into the question as box text; True also when the task's `pixel_form` reads that box text
    as a box prompt, as MedPLIB reads referring object classification's)."""
    offered = demo_tasks()
    if task not in offered:
        raise DemoError(f"Field 'task' = {task!r} is not one of {sorted(offered)}")
    template = offered[task][1]
    text = (text or "").strip()
    if "{text}" in template and not text:
        raise DemoError(f"Field 'text' is empty: task {task!r} asks {template!r}")
    if "{box}" not in template:
        return template.format(text=text), True
    if box in (None, ""):
        raise DemoError(f"Field 'box' is missing: task {task!r} names the object in a drawn box")
    parts = box if isinstance(box, (list, tuple)) else str(box).split(",")
    try:
        x1, y1, x2, y2 = (int(round(float(p))) for p in parts)
    except (TypeError, ValueError):
        raise DemoError(f"Field 'box' = {box!r} must be 4 comma-separated numbers x1,y1,x2,y2") from None
    h, w = image_shape[:2]
    if not (0 <= x1 <= x2 < w and 0 <= y1 <= y2 < h):
        raise DemoError(f"Field 'box' = {box!r} is not inside the {w}x{h} image with x1 <= x2 and y1 <= y2")
    grid = boxes.to_grid((x1, y1, x2, y2), w, h)
    question = template.format(box=boxes.write([(None, grid)]))
    from medplib import tasks

    form = tasks.get(task).pixel_form([{"from": "human", "value": question}], [], [], h, w) \
        if task in tasks.names() else None
    if form is not None and len(form[1]) == 1:  # the model reads this task's box as a box prompt: the drawn box
        return template.format(box="<region>"), True
    return question, False


def overlay(image: np.ndarray, masks: list[np.ndarray]) -> np.ndarray:
    """The image as RGB with every mask tinted red at α 0.5 (uint8, H x W x 3)."""
    rgb = np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image[..., :3]
    out = rgb.astype(np.float32)
    for m in masks:
        m = np.asarray(m, bool)
        out[m] = (1 - OVERLAY_ALPHA) * out[m] + OVERLAY_ALPHA * np.array(OVERLAY_RGB, np.float32)
    return out.round().clip(0, 255).astype(np.uint8)


def answer_boxes(answer: str, width: int, height: int) -> list[dict]:
    """The boxes an answer writes (Med-GRIT grid text), in image pixels with the name of the `<ref>` before each."""
    try:
        named = boxes.parse(answer)
    except boxes.BoxTextError:  # a malformed answer: keep the boxes that parse, unnamed (as the metrics read it)
        named = [(None, b) for b in boxes.find_boxes(answer)]
    return [{"label": name, "box": list(boxes.to_pixels(b, width, height))} for name, b in named]


class Demo:
    """What the page talks to: model choices, samples, and answering one request (one at a time: generation is
    CPU-bound and the models are shared)."""

    def __init__(self, default_model: str, registry: "Registry | None", data_dir: Path,
                 load: Callable[[str], Any], max_new_tokens: int = 48):
        self.default_model, self.registry, self.max_new_tokens = default_model, registry, max_new_tokens
        self.samples = find_samples(data_dir)
        self._load = load
        self._models: dict[str, Any] = {}  # "what the choice resolved to" → loaded model
        self._lock = threading.Lock()

    def choices(self) -> list[dict]:
        """`--model`'s choice first, then every alias and version of the registered model (newest first)."""
        out = [{"uri": self.default_model, "label": f"{self.default_model} (--model)"}]
        if self.registry is not None:
            name = self.registry.name
            for alias, version in sorted(self.registry.aliases().items()):
                out.append({"uri": f"models:/{name}@{alias}", "label": f"{alias} (version {version})"})
            for version in self.registry.versions():
                out.append({"uri": f"models:/{name}/{version}", "label": f"version {version}"})
        seen: set[str] = set()
        return [c for c in out if not (c["uri"] in seen or seen.add(c["uri"]))]

    def model(self, uri: str):
        """The loaded model a choice names now (an alias is resolved on each request, so a promotion shows)."""
        allowed = [c["uri"] for c in self.choices()]
        if uri not in allowed:
            raise DemoError(f"Field 'model' = {uri!r} is not one of the demo's models {allowed}")
        version = self.registry.version_of(uri) if self.registry is not None else None
        key = f"version {version}" if version else uri
        if key not in self._models:
            log.info("loading %s", uri)
            self._models.clear()  # one model in memory at a time
            self._models[key] = self._load(uri)
        return self._models[key]

    def sample_image(self, i: int) -> Path:
        if not 0 <= i < len(self.samples):
            raise DemoError(f"Sample {i} does not exist: there are {len(self.samples)} sample images")
        return self.samples[i].path

    def ask(self, request: dict) -> dict:
        """Answer one page request: `{answer, masks, overlay, boxes, question, model, seconds}`."""
        from medplib import tasks
        from medplib.serve import answer_rows

        unknown = sorted(set(request) - {"model", "image", "sample", "question", "text", "task", "point", "box",
                                         "region", "max_new_tokens", "examples", "example_style"})
        if unknown:
            raise DemoError(f"Unknown field '{unknown[0]}' in the request")
        image = request.get("image")
        if request.get("sample") not in (None, ""):
            try:
                index = int(request["sample"])
            except (TypeError, ValueError):
                raise DemoError(f"Field 'sample' = {request['sample']!r} is not a sample number") from None
            image = base64.b64encode(self.sample_image(index).read_bytes()).decode("ascii")
        if not image:
            raise DemoError("Field 'image' is missing: pick a sample or upload a PNG")
        try:  # base64 only: the served model also reads paths, which a page must not name
            base64.b64decode(image, validate=True)
        except (TypeError, ValueError):
            raise DemoError(f"Field 'image' must be a base64 PNG, got {str(image)[:40]!r}…") from None
        row = {"image": image, "question": "?"}
        pixels, _, _ = parse_request(row)
        task = request.get("task") or "ask"
        question, box_as_prompt = build_question(task, request.get("text") or request.get("question") or "",
                                                 request.get("box"), pixels.shape)
        examples = request.get("examples") or None
        for k, pair in enumerate(examples or []):
            for part in ("image", "mask"):
                value = pair.get(part) if isinstance(pair, dict) else None
                try:  # base64 only, as the image
                    base64.b64decode(value, validate=True)
                except (TypeError, ValueError):
                    raise DemoError(f"Field 'examples[{k}].{part}' must be a base64 PNG, got {str(value)[:40]!r}…") \
                        from None
        row = {"image": image, "question": question, "point": request.get("point"),
               "box": request.get("box") if box_as_prompt else None, "region": request.get("region"),
               "examples": examples, "example_style": request.get("example_style") or None}
        parse_request(row)  # prompt and example errors name their field before a model is loaded
        question, _, _ = parse_examples(row, 0, question)
        t0 = time.perf_counter()
        with self._lock:
            model = self.model(request.get("model") or self.default_model)
            out = answer_rows(model, [row], max_new_tokens=int(request.get("max_new_tokens") or self.max_new_tokens))[0]
        masks = [np.asarray(Image.open(io.BytesIO(base64.b64decode(m)))) > 0 for m in out["masks"]]
        h, w = pixels.shape[:2]
        if task in tasks.names():  # what the task's masks stand for, in the text (visual grounding: their boxes)
            out["answer"] = tasks.get(task).answer(out["answer"], masks)
        return {"answer": out["answer"], "question": question, "masks": out["masks"],
                "overlay": encode_png(overlay(pixels, masks)), "boxes": answer_boxes(out["answer"], w, h),
                "model": request.get("model") or self.default_model, "seconds": round(time.perf_counter() - t0, 3)}


def build_app(demo: Demo):
    """The FastAPI app of the page and its endpoints."""
    app = FastAPI(title="medplib demo", docs_url=None, redoc_url=None)

    def error(e: Exception, status: int = 400) -> JSONResponse:
        return JSONResponse({"error": str(e)}, status_code=status)

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return PAGE.replace("__TASKS__", json.dumps({k: label for k, (label, _) in demo_tasks().items()}))

    @app.get("/api/models")
    def models():
        try:
            return {"models": demo.choices()}
        except Exception as e:  # an unreachable registry is shown in the page
            return error(e, 503)

    @app.get("/api/samples")
    def samples():
        return {"samples": [{"index": i, "modality": s.modality, "name": s.path.name}
                            for i, s in enumerate(demo.samples)]}

    @app.get("/api/samples/{index}.png")
    def sample(index: int):
        try:
            return FileResponse(demo.sample_image(index), media_type="image/png")
        except DemoError as e:
            return error(e, 404)

    @app.post("/api/ask")
    async def ask(request: Request):
        try:
            body = await request.json()
        except ValueError as e:
            return error(DemoError(f"The request body is not JSON: {e}"))
        if not isinstance(body, dict):
            return error(DemoError(f"The request body must be a JSON object, got {type(body).__name__}"))
        try:
            return await run_in_threadpool(demo.ask, body)
        except (DemoError, RequestError) as e:
            return error(e)
        except Exception as e:  # the model failed: say so in the page, log the traceback here
            log.exception("demo request failed")
            return error(f"{type(e).__name__}: {e}", 500)

    return app


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>medplib demo</title>
<style>
 body{font-family:system-ui,sans-serif;margin:1.5em;max-width:1100px}
 .row{display:flex;gap:1.5em;flex-wrap:wrap} canvas,img.out{border:1px solid #999;image-rendering:pixelated}
 fieldset{margin-bottom:.8em} #error{color:#b00020;white-space:pre-wrap} #answer{font-size:1.2em}
 label{margin-right:.8em}
</style></head><body>
<h1>medplib demo</h1>
<fieldset><legend>Model</legend><select id="model"></select></fieldset>
<fieldset><legend>Image</legend><select id="sample"><option value="">pick a sample…</option></select>
 or upload a PNG <input type="file" id="upload" accept="image/png"></fieldset>
<fieldset><legend>Pixel prompt (draw on the image)</legend>
 <label><input type="radio" name="tool" value="none" checked> none</label>
 <label><input type="radio" name="tool" value="point"> point</label>
 <label><input type="radio" name="tool" value="box"> box</label>
 <label><input type="radio" name="tool" value="shape"> free-form shape</label>
 <button id="clear">clear</button> <span id="prompt"></span></fieldset>
<fieldset><legend>In-context examples (optional, up to 3: an image and its mask, PNG)</legend>
 <span id="examples"></span> shown as <select id="exstyle"><option value="overlay">mask in blue over the image</option>
 <option value="separate">mask as its own image</option></select></fieldset>
<fieldset><legend>Question</legend><select id="task"></select>
 <input id="text" size="60" placeholder="question, structure name or clinical note">
 <button id="ask">Ask</button></fieldset>
<div class="row">
 <div><div>Image and prompt</div><canvas id="canvas" width="384" height="384"></canvas></div>
 <div><div>Answer and grounded mask</div><canvas id="result" width="384" height="384"></canvas></div>
</div>
<p id="answer"></p><p id="asked"></p><p id="error"></p>
<script>
const TASKS = __TASKS__;
const $ = id => document.getElementById(id);
const canvas = $("canvas"), ctx = canvas.getContext("2d"), rctx = $("result").getContext("2d");
let image = null, imageB64 = null, sample = null, prompt = null, drawing = null, shape = [];
for (const [k, label] of Object.entries(TASKS)) $("task").add(new Option(label, k));
for (let i = 0; i < 3; i++) $("examples").insertAdjacentHTML("beforeend", `<br>example ${i + 1}: image
  <input type="file" id="exi${i}" accept="image/png"> mask <input type="file" id="exm${i}" accept="image/png">`);
function fileB64(input) { const f = input.files[0]; if (!f) return Promise.resolve(null);
  return new Promise(ok => { const rd = new FileReader(); rd.onload = () => ok(rd.result.split(",")[1]);
    rd.readAsDataURL(f); }); }
async function examples() {  // the pairs with both files chosen
  const out = [];
  for (let i = 0; i < 3; i++) { const [im, m] = await Promise.all([fileB64($("exi" + i)), fileB64($("exm" + i))]);
    if (im && m) out.push({image: im, mask: m}); }
  return out; }
function showError(msg) { $("error").textContent = msg || ""; }
async function getJSON(url) { const r = await fetch(url); const j = await r.json();
  if (!r.ok) throw new Error(j.error || r.statusText); return j; }
getJSON("/api/models").then(j => j.models.forEach(m => $("model").add(new Option(m.label, m.uri))))
  .catch(e => showError("Models: " + e.message));
getJSON("/api/samples").then(j => j.samples.forEach(s => $("sample").add(new Option(s.modality + ": " + s.name,
  s.index))));
function scale() { return image ? canvas.width / Math.max(image.width, image.height) : 1; }
function redraw() {
  ctx.clearRect(0, 0, canvas.width, canvas.height); if (!image) return;
  const s = scale(); ctx.imageSmoothingEnabled = false;
  ctx.drawImage(image, 0, 0, image.width * s, image.height * s);
  ctx.strokeStyle = "#ffd400"; ctx.fillStyle = "rgba(255,212,0,.35)"; ctx.lineWidth = 2;
  if (prompt && prompt.kind === "point") { ctx.beginPath(); ctx.arc((prompt.x + .5) * s, (prompt.y + .5) * s, 5, 0,
    7); ctx.fill(); ctx.stroke(); }
  if (prompt && prompt.kind === "box") ctx.strokeRect(prompt.x1 * s, prompt.y1 * s, (prompt.x2 - prompt.x1 + 1) * s,
    (prompt.y2 - prompt.y1 + 1) * s);
  const pts = prompt && prompt.kind === "shape" ? prompt.points : shape;
  if (pts.length) { ctx.beginPath(); pts.forEach((p, i) => i ? ctx.lineTo(p[0] * s, p[1] * s) :
    ctx.moveTo(p[0] * s, p[1] * s)); ctx.closePath(); ctx.fill(); ctx.stroke(); }
  $("prompt").textContent = prompt ? JSON.stringify(describe()) : "";
}
function loadImage(src, b64, index) {
  const im = new Image(); im.onload = () => { image = im; imageB64 = b64; sample = index; prompt = null; shape = [];
    redraw(); rctx.clearRect(0, 0, 384, 384); }; im.src = src; }
$("sample").onchange = e => { if (e.target.value !== "") loadImage("/api/samples/" + e.target.value + ".png", null,
  e.target.value); };
$("upload").onchange = e => { const f = e.target.files[0]; if (!f) return; const rd = new FileReader();
  rd.onload = () => loadImage(rd.result, rd.result.split(",")[1], null); rd.readAsDataURL(f); };
function at(e) { const r = canvas.getBoundingClientRect(), s = scale();
  return [Math.min(image.width - 1, Math.max(0, Math.floor((e.clientX - r.left) / s))),
          Math.min(image.height - 1, Math.max(0, Math.floor((e.clientY - r.top) / s)))]; }
function tool() { return document.querySelector("input[name=tool]:checked").value; }
canvas.onmousedown = e => { if (!image || tool() === "none") return; const [x, y] = at(e);
  if (tool() === "point") { prompt = {kind: "point", x, y}; redraw(); return; }
  drawing = [x, y]; shape = [[x, y]]; };
canvas.onmousemove = e => { if (!drawing) return; const [x, y] = at(e);
  if (tool() === "box") prompt = {kind: "box", x1: Math.min(drawing[0], x), y1: Math.min(drawing[1], y),
    x2: Math.max(drawing[0], x), y2: Math.max(drawing[1], y)};
  else shape.push([x, y]); redraw(); };
canvas.onmouseup = e => { if (!drawing) return; canvas.onmousemove(e); drawing = null;
  if (tool() === "shape") { prompt = {kind: "shape", points: shape}; shape = []; } redraw(); };
$("clear").onclick = () => { prompt = null; shape = []; redraw(); };
function describe() {
  if (!prompt) return {};
  if (prompt.kind === "point") return {point: prompt.x + "," + prompt.y};
  if (prompt.kind === "box") return {box: [prompt.x1, prompt.y1, prompt.x2, prompt.y2].join(",")};
  return {region: "(shape of " + prompt.points.length + " points)"};
}
function shapeMask() {  // the free-form shape as a PNG mask the size of the image
  const c = document.createElement("canvas"); c.width = image.width; c.height = image.height;
  const g = c.getContext("2d"); g.fillStyle = "#000"; g.fillRect(0, 0, c.width, c.height); g.fillStyle = "#fff";
  g.beginPath(); prompt.points.forEach((p, i) => i ? g.lineTo(p[0] + .5, p[1] + .5) : g.moveTo(p[0] + .5, p[1] + .5));
  g.closePath(); g.fill(); return c.toDataURL("image/png").split(",")[1];
}
$("ask").onclick = async () => {
  showError(""); $("answer").textContent = "…";
  if (!image) { showError("Pick a sample or upload a PNG first."); $("answer").textContent = ""; return; }
  const body = {model: $("model").value, task: $("task").value, text: $("text").value, ...describe()};
  if (prompt && prompt.kind === "shape") body.region = shapeMask();
  const ex = await examples(); if (ex.length) { body.examples = ex; body.example_style = $("exstyle").value; }
  if (sample !== null) body.sample = sample; else body.image = imageB64;
  const r = await fetch("/api/ask", {method: "POST", headers: {"Content-Type": "application/json"},
    body: JSON.stringify(body)});
  const j = await r.json();
  if (!r.ok) { showError(j.error); $("answer").textContent = ""; return; }
  $("answer").textContent = "Answer: " + j.answer; $("asked").textContent = "Asked: " + j.question +
    " (" + j.seconds + " s, " + j.masks.length + " mask(s), " + j.boxes.length + " box(es))";
  const out = new Image(); out.onload = () => { const s = scale(); rctx.imageSmoothingEnabled = false;
    rctx.clearRect(0, 0, 384, 384); rctx.drawImage(out, 0, 0, out.width * s, out.height * s);
    rctx.strokeStyle = "#00e0ff"; rctx.lineWidth = 2; rctx.fillStyle = "#00e0ff"; rctx.font = "14px sans-serif";
    j.boxes.forEach(b => { const [x1, y1, x2, y2] = b.box;
      rctx.strokeRect(x1 * s, y1 * s, (x2 - x1 + 1) * s, (y2 - y1 + 1) * s);
      if (b.label) rctx.fillText(b.label, x1 * s + 2, y1 * s + 14); }); };
  out.src = "data:image/png;base64," + j.overlay;
};
</script></body></html>
"""
