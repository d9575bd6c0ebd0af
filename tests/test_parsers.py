"""Answer parsing: class names, yes/no, numbers, VQA normalisation, box answers."""

import pytest

from earthgpt_jax.evaluate import parsers
from earthgpt_jax.evaluate.report import vqa_question_type


@pytest.mark.parametrize("text,expected", [
    ("The Planes.", "airplane"),
    ("aeroplane", "airplane"),
    ("car", "vehicle"),
    ("storage_tanks", "storage tank"),
    ("Storage-Tank", "storage tank"),
    ("This is an image of a tennis court.", "tennis court"),
    ("storagetank", "storage tank"),
    ("buses", "bus"),
    ("bus", "bus"),          # already singular: must not become 'bu'
    ("tennis", "tennis"),
    ("grass", "grass"),
    ("  Airport  ", "airport"),
    ("", ""),
])
def test_normalise_class(text, expected):
    assert parsers.normalise_class(text) == expected


def test_normalise_class_is_idempotent():
    for name in ["airplanes", "buses", "storage tanks", "The Harbours.", "golf course"]:
        once = parsers.normalise_class(name)
        assert parsers.normalise_class(once) == once


@pytest.mark.parametrize("text,expected", [
    ("Yes", "yes"), ("yes.", "yes"), ("No, there is not.", "no"), ("NO", "no"),
    ("True", "yes"), ("There is no road here", "no"), ("I cannot tell", None), ("", None),
])
def test_parse_yes_no(text, expected):
    assert parsers.parse_yes_no(text) == expected


@pytest.mark.parametrize("text,expected", [
    ("12", 12), ("There are 3 ships.", 3), ("1,024", 1024), ("seven", 7),
    ("twenty-one planes", 21), ("twenty one", 21), ("zero", 0), ("There are no ships", 0),
    ("none", 0), ("several", None), ("", None),
])
def test_parse_number(text, expected):
    assert parsers.parse_number(text) == expected


@pytest.mark.parametrize("text,expected", [
    ("The Rural area.", "rural area"), ("Two", "2"), ("0.5", "0.5"), ("1,000", "1000"),
    ("between 10m2 and 100m2", "between 10m2 and 100m2"), ("  Yes! ", "yes"),
])
def test_normalise_vqa_answer(text, expected):
    assert parsers.normalise_vqa_answer(text) == expected


@pytest.mark.parametrize("text,box,malformed", [
    ("[0.10,0.20,0.30,0.40]", [0.1, 0.2, 0.3, 0.4], 0),
    (" [ 0.1 , 0.2 , 0.3 , 0.4 ] ", [0.1, 0.2, 0.3, 0.4], 0),
    ("The box is 0.1,0.2,0.3,0.4", [0.1, 0.2, 0.3, 0.4], 0),       # no brackets
    ("[0.1,0.2,0.3,0.4", [0.1, 0.2, 0.3, 0.4], 0),                   # missing closing bracket
    ("[0.1,0.2,0.3,0.4,0.5,0.6]", [0.1, 0.2, 0.3, 0.4], 1),          # 6 numbers: no shape
    ("[0.5,0.5,0.2,0.1,0]", [0.4, 0.45, 0.6, 0.55], 0),              # centre, size, angle
    ("[0.1,0.2,1.3,0.4]", [0.1, 0.2, 1.0, 0.4], 1),                  # > 1 clipped
])
def test_parse_grounding_answer(text, box, malformed):
    got, bad = parsers.parse_grounding_answer(text)
    assert got == pytest.approx(box)
    assert bad == malformed


@pytest.mark.parametrize("text", ["[0.1,0.2,0.3]", "I cannot find it", ""])
def test_parse_grounding_answer_without_box(text):
    got, bad = parsers.parse_grounding_answer(text)
    assert got is None
    assert bad == 1


def test_parse_detection_answer_several_classes():
    text = ("There are <p>2 planes</p>[0.10,0.10,0.20,0.20;0.30,0.30,0.40,0.40] and "
            "<p>1 storage tank</p>[0.50,0.50,0.60,0.60]")
    groups, bad = parsers.parse_detection_answer(text)
    assert bad == 0
    assert [(c, n) for c, n, _ in groups] == [("airplane", 2), ("storage tank", 1)]
    assert groups[0][2] == [pytest.approx([0.1, 0.1, 0.2, 0.2]), pytest.approx([0.3, 0.3, 0.4, 0.4])]
    assert groups[1][2] == [pytest.approx([0.5, 0.5, 0.6, 0.6])]


def test_parse_detection_answer_counts_malformed():
    # Stated count 3 but two boxes (1), one box with 3 numbers dropped (1), one value > 1 (1).
    text = "There are <p>3 ships</p>[0.1,0.1,0.2,0.2;0.3,0.3,0.4;0.5,0.5,1.6,0.6]"
    groups, bad = parsers.parse_detection_answer(text)
    assert bad == 3
    assert groups[0][0] == "ship" and groups[0][1] == 3
    assert groups[0][2][1] == pytest.approx([0.5, 0.5, 1.0, 0.6])
    assert parsers.parse_detection_answer("I see nothing") == ([], 1)


@pytest.mark.parametrize("question,ref,expected", [
    ("Is there a road?", "yes", "presence"),
    ("<image>\nAre there buildings in the image?", "No", "presence"),
    ("Are there more buildings than roads?", "yes", "comparison"),
    ("Is it a rural or an urban area?", "rural", "other"),
    ("How many water areas are there?", "3", "count"),
])
def test_vqa_question_type(question, ref, expected):
    assert vqa_question_type(question, ref) == expected
