"""Serving: request parsing and its errors, models by folder or URI, the pyfunc through the registry, a real
`mlflow models serve` on 127.0.0.1 answering a pixel-prompt question with a mask, and `medplib predict`."""
from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from PIL import Image

from medplib.config import load_tracking_config
from medplib.data.images import write_png
from medplib.eval.metrics import dice_iou
from medplib.model import MedPLIB, point_prompt_mask
from medplib.registry import Registry, use_tracking
from medplib.serve import (
    RequestError, encode_png, invoke, load_model, log_pyfunc, model_folder, parse_request, predict, served,
)

from .tiny_grounder import ANSWER, QUESTION, SIZE, one_thread, phantom, train_tiny_grounder

MEDPLIB = str(Path(sys.executable).with_name("medplib"))
HELD_OUT = (30, 34)  # a disc centre the model was not trained on


def _png(mask_b64: str) -> np.ndarray:
    return np.array(Image.open(io.BytesIO(base64.b64decode(mask_b64))))


# ---- request parsing (no model) ---------------------------------------------------------------------------------

def test_parse_request_builds_prompt_masks_and_appends_region():
    image, _ = phantom(20, 20)
    img, question, regions = parse_request({"image": encode_png(image), "question": "What is this?", "point": "20,20"})
    assert img.shape == (SIZE, SIZE) and question == "What is this? <region>"
    np.testing.assert_array_equal(regions[0], point_prompt_mask(20, 20, SIZE, SIZE))
    _, _, regions = parse_request({"image": encode_png(image), "question": "In <region>?", "box": [2, 3, 10, 12]})
    assert regions[0].sum() == 9 * 10 and regions[0][3, 2] and not regions[0][2, 2]
    _, question, regions = parse_request({"image": encode_png(image), "question": "Segment the liver.",
                                          "point": float("nan"), "box": None, "region": ""})
    assert regions == [] and question == "Segment the liver."  # empty dataframe cells are "no prompt"


def test_a_point_becomes_the_square_the_model_config_says():
    """`model.point_prompt_size` (side at 336 px) sizes a served point prompt; MedPLIB's 41 when a model has none."""
    from types import SimpleNamespace

    from medplib.serve import answer_rows

    image, _ = phantom(20, 20)
    seen = []

    class Recorder:
        def __init__(self, side):
            self.config = SimpleNamespace(point_prompt_size=side) if side else SimpleNamespace()

        def generate(self, images, questions, regions, max_new_tokens):
            seen.append(regions[0][0])
            return [SimpleNamespace(text="It is the liver.", masks=[])]

    row = {"image": encode_png(image), "question": "What is this?", "point": "30,30"}
    for side in (101, None):
        assert answer_rows(Recorder(side), [row]) == [{"answer": "It is the liver.", "masks": []}]
    wide, default = seen
    np.testing.assert_array_equal(wide, point_prompt_mask(30, 30, SIZE, SIZE, 101))
    np.testing.assert_array_equal(default, point_prompt_mask(30, 30, SIZE, SIZE))
    assert wide.sum() > default.sum()


def test_in_context_examples_reach_the_model_as_shown_images_with_their_prompt():
    """A request's `examples` (JSON text as served, or a list) become the images the prompt shows, overlaid in blue or
    as mask images, and "Segment the X." a prompt with a placeholder per shown image and the query's."""
    import json
    from types import SimpleNamespace

    from medplib.serve import answer_rows

    image, target = phantom(20, 20)
    seen = {}

    class Recorder:
        config = SimpleNamespace(point_prompt_size=41)

        def generate(self, images, questions, regions, max_new_tokens, contexts=None):
            seen.update(questions=questions, contexts=contexts)
            return [SimpleNamespace(text="It is the liver.", masks=[]) for _ in images]

    pair = {"image": encode_png(image), "mask": encode_png(target)}
    rows = [{"image": encode_png(image), "question": "Segment the liver.", "examples": json.dumps([pair, pair])},
            {"image": encode_png(image), "question": "What is this?", "examples": [pair], "example_style": "separate"},
            {"image": encode_png(image), "question": "Segment the liver."}]
    answer_rows(Recorder(), rows)
    overlaid, separate, none = seen["contexts"]
    assert len(overlaid) == 2 and overlaid[0].shape == (SIZE, SIZE, 3) and none == []
    assert len(separate) == 2 and np.array_equal(separate[1], target.astype(np.uint8) * 255)
    assert (overlaid[0][target] != np.repeat(image[target][:, None], 3, axis=1)).any()  # drawn in blue
    q1, q2, q3 = seen["questions"]
    assert q1.count("<image>") == 3 and q1.endswith("Segment the liver in this image: <image>")
    assert q2.count("<image>") == 3 and q2.endswith("What is this? <image>") and q3 == "Segment the liver."
    seen.clear()
    answer_rows(Recorder(), rows[2:])
    assert seen["contexts"] is None  # no examples: generate is called as before


@pytest.mark.parametrize("row, message", [
    ({"image": "IMG", "question": "q", "examples": "[{"}, "field 'examples' is not JSON"),
    ({"image": "IMG", "question": "q", "examples": "[1]"}, "field 'examples' must be a list of"),
    ({"image": "IMG", "question": "q", "examples": [{"image": "IMG", "mask": "SMALL"}]},
     "field 'examples[0].mask' is 8x8 but its image is 64x64"),
    ({"image": "IMG", "question": "q", "examples": [{"image": "IMG", "mask": "IMG"}], "example_style": "sepia"},
     "field 'example_style' = 'sepia'"),
    ({"image": "IMG", "question": "<image> q", "examples": [{"image": "IMG", "mask": "IMG"}]},
     "with examples the prompt places them itself"),
])
def test_bad_examples_name_the_field(row, message):
    from medplib.serve import parse_examples

    subs = {"IMG": encode_png(phantom(20, 20)[0]), "SMALL": encode_png(np.ones((8, 8), bool))}
    row = {k: [{a: subs.get(b, b) for a, b in e.items()} for e in v] if isinstance(v, list) else subs.get(v, v)
           for k, v in row.items()}
    with pytest.raises(RequestError, match="Request row 3: .*" + re.escape(message)):
        parse_examples(row, 3, row["question"])


@pytest.mark.parametrize("row, message", [
    ({"question": "q"}, "field 'image' is missing"),
    ({"image": "IMG", "question": " "}, "field 'question' must be non-empty text, got ' '"),
    ({"image": "not base64!", "question": "q"}, "field 'image' is neither an existing file nor base64 ('not base64!'"),
    ({"image": "!" * 300, "question": "q"}, "field 'image' is neither an existing file nor base64 ('!!!"),  # too long
    # for a file name
    ({"image": base64.b64encode(b"not a png").decode(), "question": "q"}, "field 'image': not a readable image"),
    ({"image": "IMG", "question": "q", "point": "3"}, "field 'point' = '3' must be 2 comma-separated numbers"),
    ({"image": "IMG", "question": "q", "point": "a,b"}, "field 'point' = 'a,b' must be 2 comma-separated numbers"),
    ({"image": "IMG", "question": "q", "point": "64,3"}, "field 'point': Point (64, 3) is outside the 64x64 image"),
    ({"image": "IMG", "question": "q", "box": "10,10,5,20"}, "field 'box': Box (10, 10, 5, 20) is empty"),
    ({"image": "IMG", "question": "q", "point": "1,1", "box": "1,1,2,2"},
     "at most one pixel prompt, got ['point', 'box']"),
    ({"image": "IMG", "question": "q", "region": "SMALL"}, "field 'region': Region mask is 8x8 but the image is 64x64"),
    ({"image": "IMG", "question": "q", "mask": "x"}, "unknown field 'mask'"),
])
def test_bad_requests_name_the_field_and_value(row, message):
    subs = {"IMG": encode_png(phantom(20, 20)[0]), "SMALL": encode_png(np.ones((8, 8), bool))}
    row = {k: subs.get(v, v) if isinstance(v, str) else v for k, v in row.items()}
    with pytest.raises(RequestError, match="Request row 3: .*" + re.escape(message)):
        parse_request(row, 3)


def test_model_folder_accepts_saved_and_pyfunc_folders_and_names_bad_ones(tmp_path: Path):
    saved = tmp_path / "saved"
    (saved / "tokenizer").mkdir(parents=True)
    (saved / "config.json").write_text("{}")
    with model_folder(saved) as f:
        assert f == saved
    pyfunc = tmp_path / "pyfunc"
    shutil.copytree(saved, pyfunc / "artifacts" / "stage4")
    (pyfunc / "MLmodel").write_text("flavors:\n  python_function:\n    artifacts:\n      weights:\n"
                                    "        path: artifacts/stage4\n        uri: /x\n")
    with model_folder(pyfunc) as f:
        assert f == pyfunc / "artifacts" / "stage4"
    with pytest.raises(FileNotFoundError, match="'/no/such/model' is neither a folder nor an MLflow URI"):
        with model_folder("/no/such/model"):
            pass
    with pytest.raises(ValueError, match="holds neither a saved MedPLIB model"):
        with model_folder(tmp_path):
            pass


# ---- a trained tiny model, logged, registered and served ----------------------------------------------------------

@pytest.fixture(scope="module")
def grounder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tiny_grounder(tmp_path_factory.mktemp("grounder") / "model", steps=30)


@pytest.fixture(scope="module")
def champion_home(tmp_path_factory: pytest.TempPathFactory, grounder: Path):
    """A state folder whose sqlite registry has the grounder as version 1 = `champion`."""
    from medplib.config import resolve_home

    home = resolve_home(tmp_path_factory.mktemp("serve") / "home").ensure()
    tracking = load_tracking_config().resolved(home)
    registry = Registry(tracking)
    client = MlflowClient(tracking.tracking_uri, tracking.registry_uri)
    run_id = client.create_run(registry.experiment_id(), run_name="log-grounder").info.run_id
    with use_tracking(tracking), mlflow.start_run(run_id=run_id):
        log_pyfunc(grounder, "medplib", example_image=phantom(20, 20)[0])
    version = registry.register(run_id, "medplib", git_commit="c0ffee", data_version="phantom.dir",
                                config_digest="tiny")
    client.set_registered_model_alias(registry.name, "champion", version)
    return home, tracking, run_id


def _request(cx: int, cy: int, **prompt) -> dict:
    return {"image": encode_png(phantom(cx, cy)[0]), "question": QUESTION, **prompt}


@pytest.mark.integration
def test_registered_pyfunc_answers_like_the_model(champion_home, grounder: Path):
    home, tracking, run_id = champion_home
    cx, cy = HELD_OUT
    row = _request(cx, cy, point=f"{cx},{cy}", box=None, region=None)
    with one_thread():
        direct = MedPLIB.from_pretrained(grounder).eval().generate(
            [phantom(cx, cy)[0]], [QUESTION], [[point_prompt_mask(cx, cy, SIZE, SIZE)]])[0]
        for uri in ("models:/medplib@champion", f"runs:/{run_id}/medplib", str(grounder)):
            assert load_model(uri, tracking).generate(
                [phantom(cx, cy)[0]], [QUESTION], [[point_prompt_mask(cx, cy, SIZE, SIZE)]])[0].text == direct.text
        with use_tracking(tracking):
            pyfunc = mlflow.pyfunc.load_model("models:/medplib@champion")
        out = pyfunc.predict(pd.DataFrame([row]), params={"max_new_tokens": 12})
        # in-context examples through the logged signature (a JSON text column), as the model answers them in-process
        example, example_mask = phantom(cx + 6, cy - 6)
        shown = {**row, "examples": json.dumps([{"image": encode_png(example), "mask": encode_png(example_mask)}])}
        served_ex = pyfunc.predict(pd.DataFrame([shown]), params={"max_new_tokens": 12})[0]
        local_ex = predict(load_model(str(grounder), tracking), **shown, max_new_tokens=12)
    assert direct.text == ANSWER and out[0]["answer"] == direct.text
    np.testing.assert_array_equal(_png(out[0]["masks"][0]) > 0, direct.masks[0])
    assert served_ex == local_ex


@pytest.mark.integration
def test_mlflow_models_serve_answers_a_pixel_prompt_question_with_a_mask(champion_home, tmp_path: Path):
    home, tracking, _ = champion_home
    cx, cy = HELD_OUT
    truth = phantom(cx, cy)[1]
    with served("models:/medplib@champion", tracking, env={"OMP_NUM_THREADS": "1"},
                log_file=tmp_path / "server.log") as url:
        assert url.startswith("http://127.0.0.1:")
        answers = invoke(url, [_request(cx, cy, point=f"{cx},{cy}"),
                               _request(20, 20, box="10,10,30,30"),
                               _request(cx, cy, point=f"{cx},{cy}")], params={"max_new_tokens": 12})
        assert [a["answer"] for a in answers] == [ANSWER] * 3
        mask = _png(answers[0]["masks"][0])
        assert mask.shape == (SIZE, SIZE) and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
        dice, _ = dice_iou(mask > 0, truth)
        assert dice > 0.7, f"the served mask should find the held-out disc (Dice {dice:.3f})"
        assert answers[2] == answers[0]  # deterministic: greedy decoding, same request, same answer

        # the pixel prompts are optional columns: a plain question is accepted (this model has no answer for it)
        plain = invoke(url, [{"image": encode_png(phantom(cx, cy)[0]), "question": "Segment the liver."}])
        assert isinstance(plain[0]["answer"], str) and isinstance(plain[0]["masks"], list)
        with pytest.raises(RuntimeError, match="answered 400.*field 'point': Point \\(99, 2\\) is outside"):
            invoke(url, [_request(cx, cy, point="99,2")])
    log = (tmp_path / "server.log").read_text(errors="replace")
    assert "Uvicorn running" in log or "Application startup complete" in log, log[-2000:]
    with pytest.raises(OSError):  # stopped with its process group: nothing answers any more
        invoke(url, [_request(cx, cy)], timeout=2)


# ---- medplib predict ----------------------------------------------------------------------------------------------

def _medplib(args: list[str], home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "MEDPLIB_HOME": str(home), "OMP_NUM_THREADS": "1"}
    return subprocess.run([MEDPLIB, *args], env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.integration
def test_cli_predict_writes_the_mask(champion_home, tmp_path: Path):
    home, _, _ = champion_home
    cx, cy = HELD_OUT
    image, truth = phantom(cx, cy)
    write_png(tmp_path / "image.png", image)
    out = tmp_path / "out" / "mask.png"
    p = _medplib(["predict", "--model", "models:/medplib@champion", "--image", str(tmp_path / "image.png"),
                  "--question", QUESTION, "--point", f"{cx},{cy}", "--mask-out", str(out), "--json"], home.root)
    assert p.returncode == 0, p.stderr
    summary = json.loads(p.stdout)
    assert summary["answer"] == ANSWER and summary["masks"] == 1 and summary["mask_out"] == str(out)
    mask = np.array(Image.open(out))
    assert mask.shape == truth.shape and dice_iou(mask > 0, truth)[0] > 0.7


def test_cli_predict_names_bad_inputs(home, tmp_path: Path, capsys: pytest.CaptureFixture):
    from medplib_cli.main import main

    write_png(tmp_path / "image.png", phantom(20, 20)[0])
    write_png(tmp_path / "small.png", np.ones((8, 8), bool))
    (tmp_path / "notes.txt").write_text("not an image")
    base = ["predict", "--home", str(home.root), "--model", "models:/medplib@champion", "--question", QUESTION]
    img = ["--image", str(tmp_path / "image.png")]
    for args, message in [
        ([*img, "--point", "70,3"], "field 'point': Point (70, 3) is outside the 64x64 image"),
        ([*img, "--point", "7"], "field 'point' = '7' must be 2 comma-separated numbers"),
        ([*img, "--box", "1,2,3"], "field 'box' = '1,2,3' must be 4 comma-separated numbers"),
        ([*img, "--region", str(tmp_path / "small.png")], "Region mask is 8x8 but the image is 64x64"),
        ([*img, "--region", str(tmp_path / "none.png")], f"--region '{tmp_path / 'none.png'}': no such file"),
        (["--image", str(tmp_path / "missing.png")], f"--image '{tmp_path / 'missing.png'}': no such file"),
        (["--image", str(tmp_path / "notes.txt")], f"field 'image' ({tmp_path / 'notes.txt'}): not a readable image"),
        ([*img, "--model", "models:/medplib@nope"], "Model 'models:/medplib@nope' cannot be fetched"),
        ([*img, "--model", str(tmp_path / "nope")], f"Model '{tmp_path / 'nope'}' is neither a folder nor an MLflow"),
        ([*img, "--example", "nocolon"], "--example 'nocolon': give IMAGE:MASK, two PNG files"),
        ([*img, "--example", f"{tmp_path / 'image.png'}:{tmp_path / 'gone.png'}"],
         f"its mask '{tmp_path / 'gone.png'}' is no such file"),
        ([*img, "--example", f"{tmp_path / 'image.png'}:{tmp_path / 'small.png'}"],
         "field 'examples[0].mask' is 8x8 but its image is 64x64"),
        ([*img, *["--example", f"{tmp_path / 'image.png'}:{tmp_path / 'image.png'}"] * 4],
         "field 'examples' has 4 examples; at most 3"),
    ]:
        assert main(base + args) == 2, args
        err = capsys.readouterr().err
        assert "medplib: error: " in err and message in err, (args, err)


# ---- medplib demo -------------------------------------------------------------------------------------------------

@pytest.mark.integration
def test_demo_page_answers_a_drawn_box_with_the_mask_overlay(champion_home, tmp_path: Path):
    from fastapi.testclient import TestClient

    from medplib.demo import Demo, OVERLAY_RGB, build_app

    from .tiny_grounder import write_phantom_dataset

    home, tracking, _ = champion_home
    write_phantom_dataset(tmp_path / "data", {"test": [("ct", 30, 34), ("mr", 20, 20)]})
    registry = Registry(tracking)
    demo = Demo("models:/medplib@champion", registry, tmp_path / "data", lambda uri: load_model(uri, tracking))
    client = TestClient(build_app(demo))
    page = client.get("/")
    assert page.status_code == 200 and "<canvas" in page.text and "Name what is in the drawn box" in page.text
    models = client.get("/api/models").json()["models"]
    assert [m["uri"] for m in models] == [
        "models:/medplib@champion", "models:/medplib@challenger", "models:/medplib/1"], models
    assert [s["modality"] for s in client.get("/api/samples").json()["samples"]] == ["ct", "mr"]
    assert client.get("/api/samples/0.png").content[:4] == b"\x89PNG"

    cx, cy = HELD_OUT
    with one_thread():
        r = client.post("/api/ask", json={"model": "models:/medplib/1", "sample": 0, "task": "ask", "text": QUESTION,
                                          "box": f"{cx - 8},{cy - 8},{cx + 8},{cy + 8}"})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["answer"] == ANSWER and len(out["masks"]) == 1 and out["boxes"] == []
    mask = _png(out["masks"][0]) > 0
    assert dice_iou(mask, phantom(cx, cy)[1])[0] > 0.7
    tinted = _png(out["overlay"])
    assert tinted.shape == (SIZE, SIZE, 3)
    red = (tinted[..., 0] > tinted[..., 1] + 60)  # the overlay's red tint lies exactly on the mask
    assert (red == mask).mean() > 0.99 and OVERLAY_RGB[0] == 255

    bad = client.post("/api/ask", json={"sample": 0, "task": "ask", "text": QUESTION, "point": "99,2"})
    assert bad.status_code == 400 and "field 'point': Point (99, 2) is outside" in bad.json()["error"]
    assert client.post("/api/ask", content=b"{not json").json()["error"].startswith("The request body is not JSON")


@pytest.mark.integration
def test_cli_demo_serves_the_page_on_loopback(champion_home, tmp_path: Path):
    import urllib.request

    from medplib.serve import free_port

    home, _, _ = champion_home
    port = free_port()
    env = {**os.environ, "MEDPLIB_HOME": str(home.root), "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "demo.log", "wb") as log:
        proc = subprocess.Popen([MEDPLIB, "demo", "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
        while True:
            try:
                page = urllib.request.urlopen(url + "/", timeout=2).read().decode()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "demo.log").read_text()
                time.sleep(0.5)
        assert "medplib demo" in page
        cx, cy = HELD_OUT
        body = json.dumps({"image": encode_png(phantom(cx, cy)[0]), "text": QUESTION, "point": f"{cx},{cy}"})
        req = urllib.request.Request(url + "/api/ask", data=body.encode(), headers={"Content-Type": "application/json"})
        out = json.loads(urllib.request.urlopen(req, timeout=120).read())
        assert out["answer"] == ANSWER and out["model"] == "models:/medplib@champion" and len(out["masks"]) == 1
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)
    assert "medplib demo on http://127.0.0.1:" in (tmp_path / "demo.log").read_text()


@pytest.mark.integration
def test_demo_in_a_browser_draws_a_box_asks_and_shows_the_answer_and_overlay(champion_home, tmp_path: Path):
    """Headless Chromium (infra/chromium.sh) on `medplib demo`'s page: pick a sample, draw a box on the canvas, ask;
    the answer and the red mask overlay appear; an empty field shows its error in the page. The screenshot is kept
    in test-artifacts/."""
    import threading

    import uvicorn

    from medplib.demo import Demo, build_app
    from medplib.serve import free_port

    from .browser import ARTIFACTS, Browser
    from .tiny_grounder import write_phantom_dataset

    home, tracking, _ = champion_home
    write_phantom_dataset(tmp_path / "data", {"test": [("ct", *HELD_OUT)]})
    demo = Demo("models:/medplib@champion", Registry(tracking), tmp_path / "data",
                lambda uri: load_model(uri, tracking))
    server = uvicorn.Server(uvicorn.Config(build_app(demo), host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            assert thread.is_alive()
            time.sleep(0.05)
        url = f"http://127.0.0.1:{server.config.port}/"
        with one_thread(), Browser() as browser:
            browser.goto(url)
            browser.wait_for("document.getElementById('model').options.length >= 3 && "
                             "document.getElementById('sample').options.length == 2")
            browser.evaluate("(() => { const s = document.getElementById('sample'); s.value = '0'; "
                             "s.dispatchEvent(new Event('change')); })()")
            browser.wait_for("image !== null && image.width === 64")
            browser.click("input[name=tool][value=box]")
            left, top = browser.evaluate("(() => { const r = document.getElementById('canvas')"
                                         ".getBoundingClientRect(); return [r.x, r.y]; })()")
            cx, cy = HELD_OUT
            scale = 384 / SIZE
            # aim at pixel centres: the canvas may sit at a fractional page position
            browser.drag(left + (cx - 8 + .5) * scale, top + (cy - 8 + .5) * scale, left + (cx + 8 + .5) * scale,
                         top + (cy + 8 + .5) * scale)
            assert browser.evaluate("JSON.stringify(describe())") == json.dumps({"box": f"{cx - 8},{cy - 8},"
                                                                                        f"{cx + 8},{cy + 8}"},
                                                                                separators=(",", ":"))
            browser.evaluate(f"document.getElementById('text').value = {json.dumps(QUESTION)}")
            browser.click("#ask")
            answer = browser.wait_for("document.getElementById('answer').textContent.startsWith('Answer:') && "
                                      "document.getElementById('answer').textContent")
            assert answer == f"Answer: {ANSWER}"
            red = browser.wait_for("(() => { const d = document.getElementById('result').getContext('2d')"
                                   ".getImageData(0, 0, 384, 384).data; let n = 0; for (let i = 0; i < d.length; "
                                   "i += 4) if (d[i] > d[i + 1] + 60) n++; return n; })()")
            assert red > 36 * 40, red  # the disc's mask (r 12 px, x6 on the canvas) tinted red, not a stray pixel
            shot = browser.screenshot(ARTIFACTS / "demo-box.png")
            browser.evaluate("document.getElementById('task').value = 'grounding'; "
                             "document.getElementById('text').value = ''")
            browser.click("#ask")
            error = browser.wait_for("document.getElementById('error').textContent")
            assert error.startswith("Field 'text' is empty: task 'grounding'")
        assert shot.stat().st_size > 5000 and shot.read_bytes()[:4] == b"\x89PNG"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
