"""Property tests of the answer parsers: format then parse returns the boxes; no text crashes."""

from hypothesis import example, given, settings, strategies as st

from earthgpt_jax.data import boxes
from earthgpt_jax.evaluate import parsers

SETTINGS = settings(max_examples=150, deadline=None)
unit = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)


@st.composite
def a_box(draw):
    x0, x1 = sorted((draw(unit), draw(unit)))
    y0, y1 = sorted((draw(unit), draw(unit)))
    return (x0, y0, x1, y1)


box_lists = st.lists(a_box(), min_size=1, max_size=6)
# Names whose plural/singular round trip is exact (the detection text pluralises counts > 1).
CLASS_NAMES = ["ship", "airplane", "vehicle", "storage tank", "bus", "person", "harbor",
               "bridge", "tennis court", "baseball field"]
# Text made of the characters box answers use, so the fuzzing reaches the parser's branches.
boxy_text = st.text(alphabet="[]<>/p0123456789.,;-+e :shipandThere", max_size=120)
any_text = st.one_of(st.text(max_size=200), boxy_text)


def _close(got, want):
    return all(abs(g - w) <= 0.005 + 1e-9 for g, w in zip(got, want))


@SETTINGS
@given(box_lists)
def test_boxes_round_trip(bxs):
    parsed, malformed = boxes.parse_boxes(boxes.boxes_to_text(bxs))
    assert malformed == 0
    assert len(parsed) == len(bxs)
    assert all(_close(p, b) for p, b in zip(parsed, bxs))


@SETTINGS
@given(st.lists(st.tuples(st.sampled_from(CLASS_NAMES), box_lists), min_size=1, max_size=4,
                unique_by=lambda g: g[0]))
def test_detection_round_trip(groups):
    text = boxes.detection_to_text(groups)
    parsed, malformed = boxes.parse_detection(text)
    assert malformed == 0, text
    assert [(c, n) for c, n, _ in parsed] == [(name, len(b)) for name, b in groups]
    for (_, _, got), (_, want) in zip(parsed, groups):
        assert all(_close(p, b) for p, b in zip(got, want))
    # The answer-level parser gives canonical names for the same groups.
    answer, _ = parsers.parse_detection_answer(text)
    assert [n for _, n, _ in answer] == [len(b) for _, b in groups]


@SETTINGS
@given(any_text)
@example("9" * 400)          # parse_number once overflowed float -> int here
@example("9" * 400 + ".5")
@example("[" * 50 + "0.1,0.2")
def test_arbitrary_text_never_raises(text):
    found, malformed = boxes.parse_boxes(text)
    assert malformed >= 0
    for b in found:
        assert all(0.0 <= v <= 1.0 for v in b) and b[0] <= b[2] and b[1] <= b[3]
    groups, malformed = boxes.parse_detection(text)
    assert malformed >= 0
    box, malformed = parsers.parse_grounding_answer(text)
    assert (box is None) == (malformed > 0 and not boxes.parse_boxes(text)[0])
    parsers.parse_detection_answer(text)
    parsers.normalise_class(text)
    parsers.parse_yes_no(text)
    parsers.parse_number(text)
    parsers.normalise_vqa_answer(text)
    parsers.normalise_phrase(text)
    parsers.simple_tokens(text)


@SETTINGS
@given(st.integers(0, 10**6))
def test_numbers_parse_back(n):
    assert parsers.parse_number(f"There are {n} cars.") == n
    assert parsers.parse_number(f"{n:,}") == n
