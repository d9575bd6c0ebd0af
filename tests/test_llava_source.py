"""The `llava:JSON[:IMAGE_ROOT][:WEIGHT]` source: the spec, records in the forms GeoChat-Instruct,
LLaVA and text-only data ship (tests/fixtures/llava.py), bad records skipped and reported with
their text quoted, boxes read as `mmrs1m` reads them, a weighted mixture with an MMRS-1M stand-in
and COCO Captions (proportions over 10k samples, exact resume), the training pipeline over it,
and the README's "Fine-tune on your own data" section as written."""

import collections
import json
import os
import re

import numpy as np
import pytest

from earthgpt_jax.data import pipeline, sources
from tests.fixtures import captions, llava as llava_fixture
from tests.test_caption_sources import PROMPTS, _keys, _open, _spec

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _llava_spec(root, weight=1.0):
    return sources.parse_sources(f"llava:{root}/train.json:{root}/images:{weight}")[0]


def _open_llava(spec, report_dir=None, max_bad_fraction=0.9, min_samples=100):
    return sources.open_llava_source(spec, report_dir=report_dir,
                                     max_bad_fraction=max_bad_fraction, min_samples=min_samples)


def _by_id(src):
    out = {}
    for i in range(len(src.records)):
        record = src.to_record.map(src.records[i])
        if record is not None:
            out[record["id"]] = record
    return out


# --------------------------------------------------------------------------------------------
# The spec


def test_spec_reads_json_root_and_weight(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "d" / "imgs").mkdir(parents=True)
    (tmp_path / "d" / "2").mkdir()
    (tmp_path / "d" / "a.json").write_text("[]")
    got = sources.parse_sources("llava:~/d/a.json, llava:~/d/b.json:3,"
                                "llava:~/d/c.json:~/d/imgs, llava:~/d/e.json:./2:0.5",
                                check_paths=False)
    d = str(tmp_path / "d")
    assert [(s.kind, s.path, s.image_root, s.weight) for s in got] == [
        ("llava", f"{d}/a.json", "", 1.0), ("llava", f"{d}/b.json", "", 3.0),
        ("llava", f"{d}/c.json", f"{d}/imgs", 1.0),
        ("llava", f"{d}/e.json", os.path.abspath("2"), 0.5)]
    assert got[1].name == "llava:~/d/b.json"
    assert not sources.reads_release("llava:/x.json:2,coco:/y")


@pytest.mark.parametrize("spec, message", [
    ("llava:{d}/a.json:0", "weight must be a positive number, got '0'"),
    ("llava:{d}/a.json:", "empty image root"),
    ("llava:{d}/a.json:{d}:{d}:2", "write llava:JSON\\[:IMAGE_ROOT\\]\\[:WEIGHT\\]"),
    ("llava:{d}/missing.json", "the JSON file .*missing.json does not exist"),
    ("llava:{d}/a.json:heavy", "image root .*heavy is not a directory \\(a last part that is "
                               "a number is the weight\\)"),
    ("llava:{d}/a.json,llava:{d}/a.json:{d}:3", "is listed twice"),
])
def test_bad_llava_specs_name_the_entry(tmp_path, spec, message):
    (tmp_path / "a.json").write_text("[]")
    with pytest.raises(ValueError, match=message) as e:
        sources.parse_sources(spec.format(d=tmp_path))
    assert "config.data.sources" in str(e.value)


# --------------------------------------------------------------------------------------------
# Records


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava")
    truth = llava_fixture.write_llava(str(root))
    return root, truth


def test_good_records_in_the_real_forms(llava_dir):
    root, truth = llava_dir
    src = _open_llava(_llava_spec(root))
    got = _by_id(src)
    assert set(got) == {i for i, (_, bad) in truth.items() if bad is None}
    pixels = llava_fixture.write_images(str(root / "again"))

    refer = got["P0003_0004"]  # a bare GeoChat file name, found in its subfolder
    np.testing.assert_array_equal(refer["image"], pixels["geochat/P0003_0004.png"])
    assert refer["image_path"] == "P0003_0004.png" and refer["source"] == "train"
    assert refer["conversations"] == [  # verbatim but for `<image>\n`
        {"from": "human", "value": "[refer] Where is the storage tank at the top left?"},
        {"from": "gpt", "value": "[0.05,0.10,0.30,0.35]"}]
    assert refer["task"] == "grounding" and (refer["width"], refer["height"]) == (32, 24)
    np.testing.assert_allclose(refer["boxes"], [[0.05, 0.10, 0.30, 0.35]])
    assert refer["box_turns"].tolist() == [1] and refer["box_labels"] == [""]
    assert refer["box_corners"].shape == (1, 8)

    geochat_boxes = got["P0007_0001"]  # GeoChat's {<..>|θ} form stays text, no boxes
    assert geochat_boxes["boxes"].shape == (0, 4) and geochat_boxes["task"] == "grounding"
    assert "{<10><20><30><40>|90}" in geochat_boxes["conversations"][1]["value"]

    identify = got["P0009_0002"]  # the box in the question, labelled by the answer
    assert identify["task"] == "region_captioning"
    np.testing.assert_allclose(identify["boxes"], [[0.4, 0.4, 0.6, 0.7]])
    assert identify["box_turns"].tolist() == [0] and identify["box_labels"] == ["A white ship."]

    multi = got["airport_1"]
    assert [t["value"] for t in multi["conversations"]] == [
        "What kind of scene is this?", "An airport.", "Detect the planes.",
        "There are <p>2 planes</p>[0.10,0.10,0.20,0.20;0.50,0.50,0.60,0.65]",
        "How many runways are there?", "One."]
    assert multi["task"] == "detection" and multi["box_labels"] == ["plane", "plane"]
    assert multi["box_turns"].tolist() == [3, 3]
    np.testing.assert_array_equal(multi["image"], pixels["scenes/airport_1.png"])

    text = got["text_1"]  # text-only: a black image, the padding colour
    assert text["task"] == "text" and text["image_path"] == "train.json#4"
    assert text["image"].shape == (1, 1, 3) and not text["image"].any()
    assert text["boxes"].shape == (0, 4)


def test_bad_records_are_skipped_counted_and_quoted(llava_dir, tmp_path):
    root, truth = llava_dir
    src = _open_llava(_llava_spec(root), report_dir=str(tmp_path))
    _by_id(src)
    report = json.loads((tmp_path / "data_report_llava.json").read_text())
    want = collections.Counter(bad for _, bad in truth.values() if bad)
    assert report["bad_by_reason"] == dict(want) and report["records"] == len(truth)
    assert report["good"] == len(llava_fixture.GOOD)
    details = report["bad_details"]
    assert details["missing_image"] == ["train.json#5: image 'nowhere.png' is not under "
                                        f"{root}/images"]
    assert "leaves the image root" in details["path_outside_root"][0]
    assert details["box_outside_image"] == [  # the offending text, quoted
        "train.json#8: turn 1: box [120.0, 340.0, 560.0, 780.0] lies outside [0, 1] in "
        "'[120,340,560,780]'"]
    assert "'0.10,0.20,0.30'" in details["box_malformed"][0]
    assert "'<image>\\nAnd this?'" in details["image_marker"][0]
    assert "turn 0 is not from 'human'" in details["bad_turns"][0]
    assert "odd number of turns (3)" in details["bad_turns"][1]
    assert "turn 1 (gpt) is empty: '  '" in details["bad_turns"][2]
    assert "cannot decode image broken.png" in details["undecodable_image"][0]
    # Past config.data.max_bad_fraction the run stops, quoting a record.
    strict = _open_llava(_llava_spec(root), max_bad_fraction=0.2, min_samples=5)
    with pytest.raises(sources.BadSamplesError, match=r"llava: 2 of 7 samples read are bad .*"
                                                      r"first: train.json#5: image 'nowhere"):
        _by_id(strict)


def test_jsonl_reads_as_the_json_list_and_counts_a_broken_line(tmp_path):
    llava_fixture.write_llava(str(tmp_path / "a"), bad=False)
    llava_fixture.write_llava(str(tmp_path / "b"), jsonl=True, bad=False)
    with open(tmp_path / "b" / "train.jsonl", "a") as f:
        f.write('{"id": "cut", "conversations": [\n')
    a = _open_llava(_llava_spec(tmp_path / "a"))
    b = _open_llava(sources.parse_sources(
        f"llava:{tmp_path}/b/train.jsonl:{tmp_path}/b/images")[0])
    got_a, got_b = _by_id(a), _by_id(b)
    assert list(got_a) == list(got_b)
    for key in got_a:
        assert got_a[key]["conversations"] == got_b[key]["conversations"]
    assert b.to_record.log.bad == {"unreadable_json": 1}
    assert "Expecting" in b.to_record.log.details["unreadable_json"][0]


# --------------------------------------------------------------------------------------------
# Mixtures


@pytest.fixture(scope="module")
def mixture_dirs(llava_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    captions.write_coco(str(root / "coco"), num_images=4, captions_per_image=2, size=(20, 28))
    return llava_dir[0], root


def _mmrs1m_stand_in(root, weight):
    """An mmrs1m entry: a random-access list of records (the built split's role)."""
    coco = _open(_spec("coco", root / "coco"))
    records = [coco.to_record.map(coco.records[i]) for i in range(len(coco.records))]
    records = [r | {"key": f"data/caption/{i}"} for i, r in enumerate(records)]
    return sources.TrainSource(_spec("mmrs1m", root / "release", weight), records=records)


def _mixture(llava_root, root, weights=(5, 2, 3)):
    return [_mmrs1m_stand_in(root, weights[0]),
            _open(_spec("coco", root / "coco", weights[1]), report_dir=str(root)),
            _open_llava(_llava_spec(llava_root, weights[2]), report_dir=str(root))]


def _kind(sample) -> str:
    key = sample["key"]
    return ("mmrs1m" if key.startswith("data/") else "coco" if key.startswith("train2017/")
            else "llava")


def test_mixture_follows_the_weights_and_resumes_exactly(mixture_dirs):
    llava_root, root = mixture_dirs
    it = iter(pipeline.mixed_samples(_mixture(llava_root, root), seed=0, num_threads=1,
                                     raw=True))
    counts = collections.Counter(_kind(next(it)) for _ in range(10_000))
    shares = {k: counts[k] / 10_000 for k in ("mmrs1m", "coco", "llava")}
    print("sampled shares for weights 5:2:3 ->", shares)
    for kind, want in (("mmrs1m", 0.5), ("coco", 0.2), ("llava", 0.3)):
        assert abs(shares[kind] - want) < 0.02, shares

    # A run killed after 37 samples resumes from the checkpointed state in a new pipeline.
    it = iter(pipeline.mixed_samples(_mixture(llava_root, root), seed=0, num_threads=1,
                                     raw=True))
    _keys(it, 37)
    state = json.loads(json.dumps(it.get_state()))  # as the checkpoint stores it
    want = _keys(it, 60)
    del it
    resumed = iter(pipeline.mixed_samples(_mixture(llava_root, root), seed=0, num_threads=1,
                                          raw=True))
    resumed.set_state(state)
    assert _keys(resumed, 60) == want


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from earthgpt_jax.data.tokenizer import USER_TEMPLATE, train_tokenizer

    texts = [USER_TEMPLATE, *PROMPTS] + [t["value"] for r in llava_fixture.GOOD
                                         for t in r["conversations"]]
    return train_tokenizer(texts, str(tmp_path_factory.mktemp("tok") / "tok.model"), 400)


def test_train_dataset_over_a_llava_mixture_resumes_exactly(mixture_dirs, tokenizer):
    from earthgpt_jax.data.tokenizer import IMAGE_TOKEN

    llava_root, root = mixture_dirs
    pre = pipeline.TrainPreprocess(tokenizer.path, image_size=16, max_text_len=48)

    def batches():
        return pipeline.iterate(pipeline.train_dataset(_mixture(llava_root, root), pre,
                                                       batch_size=4, seed=0, num_threads=1))

    first = batches()
    seen = {}
    for _ in range(6):
        batch = next(first)
        assert batch["image"].shape == (4, 16, 16, 3) and batch["tokens"].shape == (4, 48)
        assert (batch["loss_mask"].sum(axis=1) > 0).all()
        assert not (batch["tokens"] == IMAGE_TOKEN).any()
        for example_id, image, tokens in zip(batch["example_id"], batch["image"],
                                             batch["tokens"]):
            seen[str(example_id)] = (image, tokenizer.decode(tokens.tolist()))
    assert not seen["train.json#4"][0].any()  # the text-only record's black image
    assert "<image>" not in seen["P0003_0004.png"][1]
    assert "[refer] Where is the storage tank" in seen["P0003_0004.png"][1]
    state = json.loads(json.dumps(first.get_state()))
    want = [next(first) for _ in range(3)]
    resumed = batches()
    resumed.set_state(state)
    for batch in want:
        got = next(resumed)
        np.testing.assert_array_equal(got["tokens"], batch["tokens"])
        np.testing.assert_array_equal(got["image"], batch["image"])


# --------------------------------------------------------------------------------------------
# README, "Fine-tune on your own data"


def _readme_section() -> str:
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    start = readme.index("## Fine-tune on your own data")
    return readme[start:readme.index("\n## ", start + 3)]


def test_readme_section_json_and_sources_as_written(tmp_path, monkeypatch, caplog):
    """The section's JSON file, written as shown, read through the section's own
    `--config.data.sources` value from a directory laid out as it says; the log line is the one
    the section shows. (The command's training run itself is main.py's: tests/test_recipe.py.)"""
    section = _readme_section()
    blocks = re.findall(r"```(\w*)\n(.*?)```", section, re.DOTALL)
    records = json.loads(next(body for lang, body in blocks if lang == "json"))
    command = next(body for lang, body in blocks if lang == "bash")
    spec = re.search(r"--config\.data\.sources=(\S+)", command).group(1)
    monkeypatch.chdir(tmp_path)
    os.makedirs("my_data")
    with open("my_data/train.json", "w") as f:
        json.dump(records, f)
    llava_fixture.write_images("my_data/images", {
        r["image"]: (20, 30) for r in records if r.get("image")})
    entries = sources.parse_sources(spec, check_paths=False)
    assert [e.kind for e in entries] == ["llava", "mmrs1m"]
    assert entries[0].image_root == str(tmp_path / "my_data" / "images")
    caplog.set_level("INFO")
    src = _open_llava(entries[0], report_dir=str(tmp_path))
    expected = re.search(r"```text\n(.*?)```", section, re.DOTALL).group(1).strip()
    assert caplog.messages[-1].replace(str(tmp_path) + "/", "") == expected
    got = _by_id(src)
    assert src.to_record.log.bad == {}
    assert {k: (r["task"], len(r["boxes"])) for k, r in got.items()} == {
        "P0003_0004": ("grounding", 1), "harbour_7": ("detection", 2), "text_1": ("text", 0)}
