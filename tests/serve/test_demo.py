"""`medplib demo`'s parts without a model: questions from the page's tasks, the overlay, boxes read from answers,
sample images, and the errors a page shows. The page answering with a served model: tests/serve/test_serve.py."""
from __future__ import annotations

import numpy as np
import pytest

from medplib import tasks
from medplib.data import boxes
from medplib.data.images import write_png
from medplib.demo import Demo, DemoError, answer_boxes, build_question, demo_tasks, find_samples, overlay

from .tiny_grounder import phantom, write_phantom_dataset

pytestmark = pytest.mark.unit


def test_each_task_builds_its_question(monkeypatch):
    shape = (64, 80)
    assert build_question("ask", "What is at <region>?", None, shape) == ("What is at <region>?", True)
    assert build_question("grounding", " liver ", None, shape) == ("Segment the liver.", True)
    assert build_question("textseg", "One finding: liver in the upper left.", None, shape)[0] == \
        "Segment: One finding: liver in the upper left."
    assert build_question("refer_vg", "kidney", None, shape)[0] == "Please ground <ref>kidney</ref> in this image."
    assert build_question("refer_mii", "", None, shape)[0] == "Interpret this medical image."
    assert build_question("report", "", None, shape)[0] == "Write the findings of this chest X-ray."
    # MedPLIB reads referring object classification's box as a box prompt (its pixel_form): the drawn box is sent as
    # one, where the question had the box text
    assert build_question("refer_ro", "", "0,0,39,31", shape) == ("What is the object in <region>?", True)
    # a task whose box stays text gets the drawn box written into the question on Med-GRIT's grid, and not as a prompt
    monkeypatch.setattr(tasks.get("refer_ro"), "box_prompts", False)
    question, box_as_prompt = build_question("refer_ro", "", "0,0,39,31", shape)
    assert not box_as_prompt
    [(name, box)] = boxes.parse(question)
    assert name is None and boxes.to_pixels(box, 80, 64) == (0, 0, 39, 31)
    # the page offers a free question and each registered task that offers itself (Task.demo)
    assert list(demo_tasks()) == ["ask", "grounding", "refer_vg", "refer_ro", "refer_mii", "textseg", "report"]


@pytest.mark.parametrize("task, text, box, message", [
    ("translate", "x", None, "Field 'task' = 'translate' is not one of"),
    ("grounding", "  ", None, "Field 'text' is empty: task 'grounding'"),
    ("refer_ro", "", None, "Field 'box' is missing"),
    ("refer_ro", "", "1,2,3", "Field 'box' = '1,2,3' must be 4 comma-separated numbers"),
    ("refer_ro", "", "10,10,5,20", "is not inside the 80x64 image with x1 <= x2"),
    ("refer_ro", "", "0,0,80,10", "is not inside the 80x64 image"),
])
def test_bad_page_fields_are_named(task, text, box, message):
    with pytest.raises(DemoError, match=message):
        build_question(task, text, box, (64, 80))


def test_overlay_tints_the_mask_and_keeps_the_rest():
    gray = np.full((4, 5), 100, np.uint8)
    mask = np.zeros((4, 5), bool)
    mask[1:3, 2:4] = True
    out = overlay(gray, [mask])
    assert out.shape == (4, 5, 3) and out.dtype == np.uint8
    assert (out[~mask] == 100).all()
    np.testing.assert_array_equal(out[mask][0], [178, 70, 70])  # 0.5 * 100 + 0.5 * (255, 40, 40)
    assert (overlay(np.stack([gray] * 3, axis=2), []) == 100).all()


def test_answer_boxes_in_pixels_with_their_names():
    answer = "The <ref>liver</ref><box>(0,0),(499,499)</box> and <box>(500,500),(999,999)</box>."
    assert answer_boxes(answer, 64, 64) == [{"label": "liver", "box": [0, 0, 31, 31]},
                                            {"label": None, "box": [32, 32, 63, 63]}]
    # a malformed answer keeps the boxes that parse, unnamed, as the metrics read it
    assert answer_boxes("<ref>liver<box>(0,0),(499,499)</box> <box>(1,2)</box>", 64, 64) == \
        [{"label": None, "box": [0, 0, 31, 31]}]
    assert answer_boxes("no box here", 64, 64) == []


def test_samples_are_test_images_per_modality(tmp_path):
    write_phantom_dataset(tmp_path, {"train": [("ct", 20, 20)],
                                     "test": [("mr", 20, 20), ("ct", 30, 30), ("ct", 40, 40), ("ct", 24, 24)]})
    samples = find_samples(tmp_path, per_modality=2)
    assert [(s.modality, s.path.name) for s in samples] == [("ct", "ct_test_30_30.png"), ("ct", "ct_test_40_40.png"),
                                                            ("mr", "mr_test_20_20.png")]
    assert all(s.path.is_file() for s in samples)
    assert find_samples(tmp_path / "nothing") == []


def test_requests_are_checked_before_a_model_is_loaded(tmp_path):
    loaded = []
    write_png(tmp_path / "x.png", phantom(20, 20)[0])
    demo = Demo("folder", None, tmp_path, loaded.append)
    for request, message in [
        ({"image": "abc", "bogus": 1}, "Unknown field 'bogus'"),
        ({"question": "hi"}, "Field 'image' is missing"),
        ({"image": str(tmp_path / "x.png"), "text": "hi"}, "Field 'image' must be a base64 PNG"),
        ({"sample": "3", "text": "hi"}, "Sample 3 does not exist: there are 0 sample images"),
        ({"sample": "x"}, "Field 'sample' = 'x' is not a sample number"),
    ]:
        with pytest.raises(DemoError, match=message):
            demo.ask(request)
    with pytest.raises(DemoError, match="Field 'model' = 'other' is not one of the demo's models \\['folder'\\]"):
        demo.model("other")
    assert loaded == []


def test_the_page_s_in_context_examples_reach_the_model_as_shown_images(tmp_path):
    """Examples uploaded in the page (base64 image and mask pairs, up to 3) are shown to the model as its style says,
    and the page is told the prompt it asked; a path, or a fourth example, is refused before a model is loaded."""
    import base64
    from types import SimpleNamespace

    from medplib.serve import RequestError, encode_png

    seen = {}

    class Recorder:
        config = SimpleNamespace(point_prompt_size=41)

        def generate(self, images, questions, regions, max_new_tokens, contexts=None):
            seen.update(questions=questions, contexts=contexts)
            return [SimpleNamespace(text="It is the liver.", masks=[])]

    loaded = []
    demo = Demo("folder", None, tmp_path, lambda uri: loaded.append(uri) or Recorder())
    image, mask = phantom(20, 20)
    pair = {"image": encode_png(image), "mask": encode_png(mask)}
    out = demo.ask({"image": encode_png(image), "task": "grounding", "text": "liver", "examples": [pair, pair],
                    "example_style": "separate"})
    assert out["answer"] == "It is the liver." and out["question"].count("<image>") == 5
    assert out["question"] == seen["questions"][0] and len(seen["contexts"][0]) == 4
    write_png(tmp_path / "x.png", image)
    with pytest.raises(DemoError, match="Field 'examples\\[0\\].mask' must be a base64 PNG"):
        demo.ask({"image": encode_png(image), "text": "hi", "examples": [{**pair, "mask": str(tmp_path / "x.png")}]})
    with pytest.raises(RequestError, match="field 'examples' has 4 examples; at most 3"):
        demo.ask({"image": encode_png(image), "text": "hi", "examples": [pair] * 4})
    assert loaded == ["folder"]  # the refused requests loaded nothing
    assert base64.b64decode(out["overlay"])[:4] == b"\x89PNG"
