"""Boxes in text (BiRD's `<ref>name</ref><box>(x1,y1),(x2,y2)</box>` on a [0, 1000) grid): parse, write, convert."""
from __future__ import annotations

import numpy as np
import pytest

from medplib.data import boxes
from medplib.data.boxes import Box, BoxTextError


def test_parse_named_bare_and_float_boxes():
    text = "The <ref>liver</ref> <box>(120,300),(480,720)</box> and a lesion <box>( 1.5 , 2 ),(3,4.25)</box>."
    assert boxes.parse(text) == [("liver", Box(120, 300, 480, 720)), (None, Box(1.5, 2, 3, 4.25))]
    # a <ref> followed by words is a mention, not the box's name; a question may name without a box
    assert boxes.parse("<ref>kidney</ref> is here <box>(0,0),(9,9)</box>") == [(None, Box(0, 0, 9, 9))]
    assert boxes.parse("Where is the <ref>spleen</ref>?") == []


@pytest.mark.parametrize("text, kind, value", [
    ("<box>(1,2),(3)</box>", "malformed box text", "<box>(1,2),(3)</box>"),
    ("<box>(a,2),(3,4)</box>", "malformed box text", "<box>(a,2),(3,4)</box>"),
    ("<box>(1,2),(3,4)", "malformed box text", "<box>(1,2),(3,4)"),
    ("liver</ref><box>(1,2),(3,4)</box>", "malformed box text", "</ref><box>(1,2),(3,4)</box>"),
    ("<ref></ref><box>(1,2),(3,4)</box>", "malformed box text", "<ref></ref>"),
    ("<box>(50,2),(30,4)</box>", "box corners reversed", "<box>(50,2),(30,4)</box>"),
    ("<box>(1,40),(3,4)</box>", "box corners reversed", "<box>(1,40),(3,4)</box>"),
    ("<box>(1,2),(1000,4)</box>", "coordinate outside the grid", "<box>(1,2),(1000,4)</box>"),
    ("<box>(-1,2),(3,4)</box>", "coordinate outside the grid", "<box>(-1,2),(3,4)</box>"),
])
def test_malformed_box_text_names_the_text_and_the_kind(text, kind, value):
    with pytest.raises(BoxTextError) as err:
        boxes.parse(text)
    assert err.value.reason.split(":")[0] == kind and err.value.value == value


def test_paired_text_needs_a_ref_for_every_box():
    pairs = "<ref>a</ref><box>(1,2),(3,4)</box> and <ref>b</ref><box>(5,6),(7,8)</box>"
    assert [n for n, _ in boxes.parse(pairs, paired=True)] == ["a", "b"]
    for text, counts in (("<ref>a</ref><box>(1,2),(3,4)</box><box>(5,6),(7,8)</box>", "1 <ref> but 2 <box>"),
                         ("<ref>a</ref> and <ref>b</ref><box>(1,2),(3,4)</box>", "2 <ref> but 1 <box>"),
                         ("<box>(1,2),(3,4)</box><ref>a</ref>", "1 <ref> but 1 <box> (0 named")):
        with pytest.raises(BoxTextError, match="<ref>/<box> counts disagree") as err:
            boxes.parse(text, paired=True)
        assert counts in err.value.reason
        boxes.parse(text)  # unpaired reading accepts the same text


def test_write_then_parse_round_trips():
    pairs = [("left kidney", Box(10, 20, 30, 40)), (None, Box(0.5, 0, 999, 999.25))]
    text = boxes.write(pairs)
    assert text == "<ref>left kidney</ref><box>(10,20),(30,40)</box><box>(0.5,0),(999,999.25)</box>"
    assert boxes.parse(text, paired=False) == pairs
    with pytest.raises(ValueError, match="without <ref>/<box> tags"):
        boxes.write([("a<box>", Box(1, 1, 2, 2))])
    with pytest.raises(BoxTextError, match="box corners reversed"):
        Box(5, 5, 4, 6)


def test_iou():
    a = Box(0, 0, 100, 100)
    assert boxes.iou(a, a) == 1.0
    assert boxes.iou(a, Box(50, 0, 150, 100)) == pytest.approx(5000 / 15000)
    assert boxes.iou(a, Box(200, 200, 300, 300)) == 0.0
    assert boxes.iou(Box(5, 5, 5, 5), Box(5, 5, 5, 5)) == 0.0  # empty union
    assert boxes.iou(a, Box(0, 0, 100, 50)) == 0.5


@pytest.mark.parametrize("side", [64, 333, 1000, 2048])
def test_pixel_grid_round_trip(side: int):
    rng = np.random.default_rng(side)
    for _ in range(50):
        x1, x2 = sorted(rng.integers(0, side, 2))
        y1, y2 = sorted(rng.integers(0, side, 2))
        grid = boxes.to_grid((x1, y1, x2, y2), side, side)
        assert all(0 <= v < boxes.GRID and float(v).is_integer() for v in (grid.x1, grid.y1, grid.x2, grid.y2))
        back = boxes.to_pixels(grid, side, side)
        if side <= boxes.GRID:
            assert back == (x1, y1, x2, y2)
        else:  # several pixels share a grid cell: the whole cells come back
            assert back[0] <= x1 and back[2] >= x2 and boxes.to_grid(back, side, side) == grid
    assert boxes.to_grid((side - 1, side - 1, side - 1, side - 1), side, side).x2 == pytest.approx(
        (side - 1) * 1000 // side)
    with pytest.raises(ValueError, match="is not inside"):
        boxes.to_grid((0, 0, side, 1), side, side)


def test_mask_bounding_box_and_box_mask():
    mask = np.zeros((50, 80), bool)
    mask[10:21, 40:61] = True
    box = boxes.mask_box(mask)
    assert box == Box(500, 200, 750, 400)
    assert boxes.to_pixels(box, 80, 50) == (40, 10, 60, 20)
    assert (boxes.box_mask(box, 80, 50) == mask).all()
    assert boxes.mask_box(np.zeros((4, 4), bool)) is None


def test_predicted_boxes_are_read_leniently():
    assert boxes.find_boxes("It is <box>(10,10),(20,20)</box> or <box>(5,5),(1,1)</box> <box>junk</box>") == [
        Box(10, 10, 20, 20)]
    assert boxes.find_boxes("at (587,126),(789,217) I think") == [Box(587, 126, 789, 217)]
    assert boxes.find_boxes("no box here") == []


def test_random_box_hit_rate():
    from medplib.data.boxes import random_box_hit_rate

    whole = Box(0, 0, 999, 999)
    assert random_box_hit_rate(999, 999, whole) == 1.0  # the only placement is the box itself
    assert random_box_hit_rate(999, 999, Box(0, 0, 100, 100)) == 0.0  # IoU at most 1 %
    # a full-height box of width 300 over a truth of the same size in the middle: IoU > 0.5 when |dx| < 100
    assert random_box_hit_rate(300, 999, Box(350, 0, 650, 999)) == pytest.approx(200 / 699, abs=0.02)
    # small boxes almost never land by chance
    assert 0.0 < random_box_hit_rate(200, 200, Box(400, 400, 600, 600)) < 0.05
    with pytest.raises(ValueError, match="width -1"):
        random_box_hit_rate(-1, 10, whole)


def test_a_run_of_boxes_becomes_one_seg_whose_mask_is_their_union():
    text = "<ref>liver</ref><box>(0,0),(499,499)</box> <box>(500,500),(999,999)</box>, and <box>(0,500),(499,999)</box>."
    out, masks = boxes.as_masks(text, 10, 10, "<SEG>")
    assert out == "<ref>liver</ref><SEG>, and <SEG>."  # the <ref> stays before the run it names
    assert [int(m.sum()) for m in masks] == [50, 25] and masks[0][:5, :5].all() and masks[0][5:, 5:].all()
    assert not masks[0][:5, 5:].any() and masks[1][5:, :5].all()
    assert boxes.as_masks("No box here, <ref>liver</ref> only.", 10, 10, "<SEG>") is None
    with pytest.raises(BoxTextError, match="box corners reversed"):
        boxes.as_masks("<box>(50,2),(30,4)</box>", 10, 10, "<SEG>")


def test_a_masks_parts_are_its_boxes_specks_left_out():
    mask = np.zeros((20, 20), bool)
    mask[2:8, 2:10] = True  # 48 px
    mask[12:18, 12:16] = True  # 24 px: a second part
    mask[0, 19] = True  # 1 px < 10% of 48: a speck
    assert boxes.mask_boxes(mask) == [boxes.to_grid((2, 2, 9, 7), 20, 20), boxes.to_grid((12, 12, 15, 17), 20, 20)]
    assert boxes.mask_boxes(np.zeros((20, 20), bool)) == []
    # the k-th <SEG> gets the k-th mask's boxes; an empty mask answers no box; a <SEG> past the masks stays
    text = boxes.from_masks("<ref>a</ref><SEG> and <ref>b</ref><SEG><SEG>", [mask, np.zeros((20, 20), bool)], "<SEG>")
    assert text == ("<ref>a</ref><box>(100,100),(450,350)</box><box>(600,600),(750,850)</box> and <ref>b</ref>"
                    "<SEG>")
    # a box learned as a mask comes back as the same box
    _, (learned,) = boxes.as_masks("<box>(100,200),(449,649)</box>", 20, 20, "<SEG>")
    assert boxes.mask_boxes(learned) == [Box(100, 200, 400, 600)]
