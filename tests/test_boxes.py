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
    found, bad = boxes.parse_boxes("[0.1,0.2,0.3,0.4,0.5]")
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
