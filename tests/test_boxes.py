"""Box text <-> boxes, and the pad-to-square inverse on tall and wide images."""

import numpy as np
import pytest

from earthgpt_jax.data import boxes


@pytest.mark.parametrize("width,height", [(80, 60), (60, 80), (64, 64), (97, 54), (33, 90)])
def test_pixel_box_round_trip_through_text(width, height):
    rng = np.random.default_rng(width * height)
    for _ in range(20):
        x0, x1 = sorted(rng.uniform(0, width, 2))
        y0, y1 = sorted(rng.uniform(0, height, 2))
        text = boxes.boxes_to_text([boxes.pixel_to_norm((x0, y0, x1, y1), width, height)])
        parsed, malformed = boxes.parse_boxes(text)
        assert malformed == 0 and len(parsed) == 1
        back = boxes.norm_to_pixel(parsed[0], width, height)
        side = max(width, height)
        # Two decimals lose at most half a hundredth of the padded side.
        assert np.max(np.abs(np.subtract(back, (x0, y0, x1, y1)))) <= 0.005 * side + 1e-9


def test_pad_offsets_follow_the_release_rule():
    assert boxes.pad_offsets(100, 60) == (0, 20, 100)   # wide: pad top/bottom
    assert boxes.pad_offsets(60, 101) == (20, 0, 101)   # tall: floor((101-60)/2)
    assert boxes.pad_offsets(50, 50) == (0, 0, 50)
    with pytest.raises(ValueError, match="positive"):
        boxes.pad_offsets(0, 10)


def test_release_example_box():
    # 200x100 image, box x0=50,y0=10,w=20,h=30 -> pad_y=50 -> [0.25,0.30,0.35,0.45]
    norm = boxes.pixel_to_norm((50, 10, 70, 40), 200, 100)
    assert boxes.boxes_to_text([norm]) == "[0.25,0.30,0.35,0.45]"


def test_several_boxes_and_tolerant_parsing():
    text = boxes.boxes_to_text([(0.1, 0.2, 0.3, 0.4), (0.5, 0.5, 0.6, 0.7)])
    assert text == "[0.10,0.20,0.30,0.40;0.50,0.50,0.60,0.70]"
    assert boxes.parse_boxes(" [ 0.1 , 0.2,0.3 ,0.4 ] ") == ([(0.1, 0.2, 0.3, 0.4)], 0)
    assert boxes.parse_boxes("0.1,0.2,0.3,0.4") == ([(0.1, 0.2, 0.3, 0.4)], 0)
    found, bad = boxes.parse_boxes("[0.1,0.2,0.3]")
    assert found == [] and bad == 1
    found, bad = boxes.parse_boxes("[0.1,0.2,1.3,0.4]")
    assert found == [(0.1, 0.2, 1.0, 0.4)] and bad == 1
    found, bad = boxes.parse_boxes("[0.1,0.2,0.3,0.4,0.5,0.6]")
    assert found == [(0.1, 0.2, 0.3, 0.4)] and bad == 1
    assert boxes.parse_boxes("no box here") == ([], 1)


def test_detection_text_round_trip():
    groups = [("ship", [(0.75, 0.69, 0.76, 0.71), (0.1, 0.1, 0.2, 0.2)]),
              ("person", [(0.3, 0.3, 0.35, 0.4)])]
    text = boxes.detection_to_text(groups)
    assert text == ("There are <p>2 ships</p>[0.75,0.69,0.76,0.71;0.10,0.10,0.20,0.20] and "
                    "<p>1 person</p>[0.30,0.30,0.35,0.40]")
    parsed, malformed = boxes.parse_detection(text)
    assert malformed == 0
    assert [(c, n) for c, n, _ in parsed] == [("ship", 2), ("person", 1)]
    assert parsed[0][2][0] == (0.75, 0.69, 0.76, 0.71)
    # The count disagrees with the boxes: kept, but counted.
    parsed, malformed = boxes.parse_detection("There are <p>3 ships</p>[0.1,0.1,0.2,0.2]")
    assert parsed[0][1] == 3 and len(parsed[0][2]) == 1 and malformed == 1
    assert boxes.singular("buses") == "bus" and boxes.singular("bus") == "bus"


def test_no_objects_answer_is_one_documented_sentence():
    """An empty scene is written NO_OBJECTS_ANSWER and read back as an empty detection (not
    malformed); MMRS-1M-style wordings that say 'no objects' read the same, other text without
    a group stays malformed."""
    assert boxes.detection_to_text([]) == boxes.NO_OBJECTS_ANSWER == "There are no objects."
    assert boxes.parse_detection(boxes.NO_OBJECTS_ANSWER) == ([], 0)
    assert boxes.parse_detection("There are no objects in this image.") == ([], 0)
    assert boxes.parse_detection("no object") == ([], 0)
    assert boxes.parse_detection("I see nothing") == ([], 1)
    # Boxes beside the sentence are not an empty answer: the groups decide.
    groups, bad = boxes.parse_detection("There are no objects <p>1 ship</p>[0.1,0.1,0.2,0.2]")
    assert [(c, n) for c, n, _ in groups] == [("ship", 1)] and bad == 0


def test_oriented_boxes_corners_and_centre_size_angle():
    """Four corners and centre/size/angle are oriented boxes, written as corners, each with
    its enclosing horizontal box; any other shape is bad, its text kept."""
    quad = (0.2, 0.1, 0.4, 0.3, 0.3, 0.4, 0.1, 0.2)
    text = boxes.detection_to_text([("ship", [quad])])
    assert text == "There is <p>1 ship</p>[0.20,0.10,0.40,0.30,0.30,0.40,0.10,0.20]"
    shapes = boxes.parse_shapes(text)
    assert shapes.corners == [pytest.approx(quad)] and shapes.malformed == 0
    assert shapes.boxes == [pytest.approx((0.1, 0.1, 0.4, 0.4))]
    groups, bad = boxes.parse_detection(text, corners=True)
    assert groups == [("ship", 1, [pytest.approx(quad)])] and bad == 0
    assert boxes.parse_detection(text)[0][0][2] == [pytest.approx((0.1, 0.1, 0.4, 0.4))]
    # A 0.4 x 0.2 box centred at (0.5, 0.5), turned 90 degrees: 0.2 wide, 0.4 tall.
    turned = boxes.parse_shapes("[0.5,0.5,0.4,0.2,90]")
    assert turned.boxes == [pytest.approx((0.4, 0.3, 0.6, 0.7))]
    assert turned.corners[0] == pytest.approx((0.6, 0.3, 0.6, 0.7, 0.4, 0.7, 0.4, 0.3))
    # 45 degrees: a 0.2 square's corners on the axes through its centre.
    diamond = boxes.rotated_corners(0.5, 0.5, 0.2, 0.2, 45)
    d = 0.1 * 2 ** 0.5
    assert diamond == pytest.approx((0.5, 0.5 - d, 0.5 + d, 0.5, 0.5, 0.5 + d, 0.5 - d, 0.5))
    # A horizontal box's corners are its rectangle; 6 or 7 values are no shape.
    assert boxes.parse_shapes("[0.1,0.2,0.3,0.4]").corners == [(0.1, 0.2, 0.3, 0.2, 0.3, 0.4,
                                                                 0.1, 0.4)]
    bad = boxes.parse_shapes("[0.1,0.2,0.3,0.4;0.1,0.1,0.2,0.2,0.3,0.3,0.4]")
    assert len(bad.boxes) == 2 and bad.malformed == 1  # its first four values kept
    assert bad.bad == ["0.1,0.1,0.2,0.2,0.3,0.3,0.4"]
    # Pixel corners through the pad and back.
    px = (10, 5, 30, 5, 30, 15, 10, 15)
    norm = boxes.pixel_to_norm(px, 40, 20)
    assert norm == pytest.approx((0.25, 0.375, 0.75, 0.375, 0.75, 0.625, 0.25, 0.625))
    assert boxes.norm_to_pixel(norm, 40, 20) == pytest.approx(px)

