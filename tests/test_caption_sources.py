"""Stage-A caption sources: the `config.data.sources` spec, COCO Captions and img2dataset
webdataset shards read from their real layouts (tests/fixtures/captions.py), bad samples
counted, exact resume of the shard stream, the per-process shard split, weighted mixing and the
whole training pipeline over a mixture."""

import collections
import json
import os

import numpy as np
import pytest

from earthgpt_jax.data import pipeline, sources
from tests.fixtures import captions

PROMPTS = ("Describe the image concisely.", "Write a short caption for the image.")


def _open(spec: sources.SourceSpec, report_dir=None, max_bad_fraction=0.5, min_samples=100):
    return sources.open_caption_source(spec, prompts=PROMPTS, seed=0, report_dir=report_dir,
                                       max_bad_fraction=max_bad_fraction,
                                       min_samples=min_samples)


def _spec(kind, path, weight=1.0):
    return sources.SourceSpec(kind, os.path.abspath(path), weight, f"{kind}:{path}", str(path))


# --------------------------------------------------------------------------------------------
# The spec


def test_spec_parses_kinds_weights_and_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "coco").mkdir()
    (tmp_path / "laion").mkdir()
    got = sources.parse_sources(" coco:~/coco:1, webdataset:~/laion:4.5 ,mmrs1m:/nowhere",
                                allow_missing=("mmrs1m",))
    assert [(s.kind, s.path, s.weight) for s in got] == [
        ("coco", str(tmp_path / "coco"), 1.0), ("webdataset", str(tmp_path / "laion"), 4.5),
        ("mmrs1m", "/nowhere", 1.0)]
    assert got[0].name == "coco:~/coco"  # the mixture's state key: the path as written
    assert sources.parse_sources("") == [] and sources.parse_sources(" , ") == []
    assert sources.reads_release("") and sources.reads_release("mmrs1m:/x,coco:/y")
    assert not sources.reads_release("coco:/y,webdataset:/z:2")


@pytest.mark.parametrize("spec, message", [
    ("coco", "'coco': no path"),
    ("coco::2", "'coco::2': no path"),
    ("coco:{d}:0", "weight must be a positive number, got '0'"),
    ("coco:{d}:-1", "weight must be a positive number"),
    ("coco:{d}:heavy", "weight 'heavy' is not a number"),
    ("coco:{d}:", "weight '' is not a number"),
    ("laion:{d}", "unknown kind 'laion'; known kinds: mmrs1m, coco, webdataset, llava"),
    ("coco:{d}/missing:1", "directory .*missing does not exist"),
    ("coco:{d},coco:{d}:3", "is listed twice"),
])
def test_bad_specs_name_the_entry(tmp_path, spec, message):
    spec = spec.format(d=tmp_path)
    with pytest.raises(ValueError, match=message) as e:
        sources.parse_sources("webdataset:" + str(tmp_path) + "/ok:1," + spec,
                              allow_missing=("webdataset",))
    assert "config.data.sources" in str(e.value)


# --------------------------------------------------------------------------------------------
# COCO


def test_coco_samples_are_the_fixture_captions_and_images(tmp_path):
    truth = captions.write_coco(str(tmp_path / "coco"), num_images=3, captions_per_image=2)
    src = _open(_spec("coco", tmp_path / "coco"))
    assert len(src.records) == len(truth) == 6
    prompts_seen = set()
    for i, want in enumerate(truth):
        record = src.to_record.map(src.records[i])
        assert record["image_path"] == want.image_path and record["source"] == "coco"
        human, gpt = record["conversations"]
        assert (human["from"], gpt["from"]) == ("human", "gpt")
        assert human["value"] in PROMPTS and gpt["value"] == want.caption
        assert gpt["value"] == gpt["value"].strip() and gpt["value"]
        assert human["value"] == sources.pick_prompt(PROMPTS, want.key, 0)
        prompts_seen.add(human["value"])
        np.testing.assert_array_equal(record["image"], want.pixels)
        assert (record["task"], record["sensor"]) == ("caption", "optical")
        assert (record["width"], record["height"]) == (8, 6)
    assert prompts_seen == set(PROMPTS)  # the hash spreads the prompts


def test_coco_bad_samples_are_skipped_counted_and_reported(tmp_path):
    truth = captions.write_coco(str(tmp_path / "coco"), num_images=4, captions_per_image=2,
                                bad={0: "corrupt_jpg", 2: "missing_jpg", 3: "empty_caption"})
    src = _open(_spec("coco", tmp_path / "coco"), report_dir=str(tmp_path))
    got = [src.to_record.map(src.records[i]) for i in range(len(src.records))]
    assert [r is None for r in got] == [t.bad is not None for t in truth]
    report = json.loads((tmp_path / "data_report_coco.json").read_text())
    assert report["records"] == 8 and report["good"] == 2 and report["bad"] == 6
    assert report["bad_by_reason"] == {"undecodable_image": 2, "missing_image": 2,
                                       "empty_caption": 2}
    assert report["bad_examples"]["missing_image"] == [t.key for t in truth
                                                       if t.bad == "missing_jpg"]
    # Past max_bad_fraction (after min_samples) the run stops, naming reasons and keys.
    strict = _open(_spec("coco", tmp_path / "coco"), max_bad_fraction=0.2, min_samples=2)
    with pytest.raises(sources.BadSamplesError, match=r"2 of 2 samples read are bad.*undecodable_image: 2 \(e.g. "
                                                      r"'train2017/000000000009.jpg#1000'"):
        for i in range(len(strict.records)):
            strict.to_record.map(strict.records[i])


def test_coco_without_annotations_names_the_file(tmp_path):
    (tmp_path / "coco" / "train2017").mkdir(parents=True)
    with pytest.raises(ValueError, match="annotations/captions_train2017.json do not exist"):
        _open(_spec("coco", tmp_path / "coco"))


# --------------------------------------------------------------------------------------------
# webdataset


def _keys(iterator, n):
    return [next(iterator)["key"] for _ in range(n)]


def test_webdataset_yields_every_fixture_sample_and_counts_the_bad(tmp_path):
    bad = {(0, 1): "corrupt_jpg", (1, 0): "missing_txt", (2, 3): "empty_caption",
           (2, 2): "missing_jpg"}
    truth = captions.write_webdataset(str(tmp_path / "wds"), num_shards=3, samples_per_shard=4,
                                      bad=bad)
    assert sorted(os.listdir(tmp_path / "wds"))[:3] == ["00000.parquet", "00000.tar",
                                                        "00000_stats.json"]
    src = _open(_spec("webdataset", tmp_path / "wds"), report_dir=str(tmp_path))
    it = iter(src.stream)
    by_key = {t.key: t for shard in truth.values() for t in shard}
    records = {}
    for _ in range(12):  # one epoch: every sample once
        raw = next(it)
        record = src.to_record.map(raw)
        if record is not None:
            records[raw["key"]] = record
    assert it.get_state() == {"epoch": 0, "shard_index": 2, "samples_in_shard": 4}
    assert set(records) == {k for k, t in by_key.items() if not t.bad}
    for key, record in records.items():
        assert record["conversations"][1]["value"] == by_key[key].caption
        assert record["conversations"][0]["value"] == sources.pick_prompt(PROMPTS, key, 0)
        np.testing.assert_array_equal(record["image"], by_key[key].pixels)
        assert record["source"] == "webdataset" and record["image_path"] == key
    report = json.loads((tmp_path / "data_report_webdataset.json").read_text())
    assert report["bad_by_reason"] == {"undecodable_image": 1, "missing_caption": 1,
                                       "empty_caption": 1, "missing_image": 1}
    assert report["bad_examples"]["missing_caption"] == ["00001.tar/000010000"]
    # The file is a snapshot written when a bad sample is met; the log counts everything.
    assert report["records"] <= 12 and src.to_record.log.as_dict()["records"] == 12


def test_webdataset_resumes_exactly_mid_shard_and_across_epochs(tmp_path):
    captions.write_webdataset(str(tmp_path / "wds"), num_shards=3, samples_per_shard=5)
    stream = _open(_spec("webdataset", tmp_path / "wds")).stream
    reference = _keys(iter(stream), 50)  # 3 epochs and more
    epochs = [reference[i:i + 15] for i in (0, 15, 30)]
    assert all(sorted(e) == sorted(epochs[0]) for e in epochs)
    assert epochs[0] != epochs[1] or epochs[1] != epochs[2]  # shard order reshuffled per epoch
    for stop in (3, 7, 15, 17, 29, 30, 31):  # mid-shard, shard end, epoch end, next epoch
        it = iter(stream)
        _keys(it, stop)
        state = json.loads(json.dumps(it.get_state()))  # as the checkpoint stores it
        resumed = iter(stream)
        resumed.set_state(state)
        assert _keys(resumed, 12) == reference[stop:stop + 12], stop


def test_shard_split_is_disjoint_and_complete_per_epoch(tmp_path):
    shards = [f"/s/{i:05d}.tar" for i in range(7)]
    stream = sources.WebDatasetShards(shards, seed=3)
    for epoch in range(3):
        for count in (1, 2, 3, 7):
            parts = [stream.for_process(i, count).epoch_shards(epoch) for i in range(count)]
            flat = [s for p in parts for s in p]
            assert sorted(flat) == shards and len(set(flat)) == len(flat)
        # grain worker processes split a process's shards again
        mine = stream.for_process(1, 2)
        workers = []
        for w in range(2):
            part = mine.for_process(1, 2)
            part.set_slice(slice(w, None, 2))
            workers.append(part.epoch_shards(epoch))
        assert sorted(workers[0] + workers[1]) == sorted(mine.epoch_shards(epoch))
    with pytest.raises(ValueError, match="3 shards for 4 processes"):
        sources.WebDatasetShards(shards[:3], seed=0, process_count=4)
    with pytest.raises(ValueError, match="cannot feed 2 processes x 4 grain workers"):
        sources.WebDatasetShards(shards[:3], seed=0, process_count=2).set_slice(
            slice(3, None, 4))


# --------------------------------------------------------------------------------------------
# Mixtures


@pytest.fixture(scope="module")
def caption_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("captions")
    coco = captions.write_coco(str(root / "coco"), num_images=6, captions_per_image=2,
                               bad={5: "corrupt_jpg"}, size=(20, 28))
    wds = captions.write_webdataset(str(root / "wds"), num_shards=4, samples_per_shard=6,
                                    bad={(1, 2): "missing_txt"}, size=(24, 16))
    return {"root": root, "coco": coco, "wds": wds}


def _mixture(root, weights=(1, 4)):
    return [_open(_spec("coco", root / "coco", weights[0]), report_dir=str(root)),
            _open(_spec("webdataset", root / "wds", weights[1]), report_dir=str(root))]


def test_mixture_follows_the_weights_and_resumes_exactly(caption_dirs):
    root = caption_dirs["root"]
    mix = pipeline.mixed_samples(_mixture(root, (1, 4)), seed=0, num_threads=1, raw=True)
    it = iter(mix)
    counts = collections.Counter()
    for _ in range(10_000):
        counts["coco" if next(it)["key"].startswith("train2017/") else "webdataset"] += 1
    assert abs(counts["coco"] / 10_000 - 0.2) < 0.02
    assert abs(counts["webdataset"] / 10_000 - 0.8) < 0.02

    it = iter(pipeline.mixed_samples(_mixture(root, (2, 3)), seed=0, num_threads=1, raw=True))
    _keys(it, 37)
    state = json.loads(json.dumps(it.get_state()))
    want = _keys(it, 40)
    resumed = iter(pipeline.mixed_samples(_mixture(root, (2, 3)), seed=0, num_threads=1,
                                          raw=True))
    resumed.set_state(state)
    assert _keys(resumed, 40) == want


@pytest.fixture(scope="module")
def tokenizer(caption_dirs, tmp_path_factory):
    from earthgpt_jax.data.tokenizer import USER_TEMPLATE, train_tokenizer

    texts = [USER_TEMPLATE, *PROMPTS] + [t.caption for t in caption_dirs["coco"]] + [
        t.caption for shard in caption_dirs["wds"].values() for t in shard]
    return train_tokenizer(texts, str(tmp_path_factory.mktemp("tok") / "tok.model"), 400)


def test_train_dataset_over_a_caption_mixture(caption_dirs, tokenizer):
    from earthgpt_jax.data import packing

    root = caption_dirs["root"]
    pre = pipeline.TrainPreprocess(tokenizer.path, image_size=16, max_text_len=32)
    batches = pipeline.iterate(pipeline.train_dataset(_mixture(root), pre, batch_size=4,
                                                      seed=0, num_threads=1))
    seen = set()
    for _ in range(4):
        batch = next(batches)
        assert batch["image"].shape == (4, 16, 16, 3) and batch["image"].dtype == np.uint8
        assert batch["tokens"].shape == batch["loss_mask"].shape == (4, 32)
        assert (batch["loss_mask"].sum(axis=1) > 0).all()
        seen.update(batch["example_id"].tolist())
    assert any(k.startswith("train2017/") for k in seen)
    assert any(".tar/" in k for k in seen)

    options = packing.PackingOptions(length=80, images_per_row=3, visual_tokens=4,
                                     bos_id=tokenizer.bos_id, bins_per_batch=4)
    rows = pipeline.iterate(pipeline.train_dataset(_mixture(root), pre, batch_size=2, seed=0,
                                                   num_threads=1, packing=options))
    for _ in range(2):
        batch = next(rows)
        assert batch["image"].shape == (2, 3, 16, 16, 3)
        assert batch["tokens"].shape == batch["segment_ids"].shape == (2, 80)
        assert batch["segment_ids"].max() >= 2  # several captions share a row


def test_single_random_access_source_is_the_plain_pipeline(caption_dirs, tokenizer):
    """A list holding one random-access source without caption conversion (an mmrs1m entry)
    gives the batches and state of the source alone."""
    root = caption_dirs["root"]
    coco = _open(_spec("coco", root / "coco"))
    records = [r for r in (coco.to_record.map(coco.records[i]) for i in range(10)) if r]
    entry = sources.TrainSource(_spec("mmrs1m", root), records=records)
    pre = pipeline.TrainPreprocess(tokenizer.path, image_size=16, max_text_len=32)
    a = pipeline.iterate(pipeline.train_dataset(records, pre, batch_size=2, seed=1,
                                                num_threads=1))
    b = pipeline.iterate(pipeline.train_dataset([entry], pre, batch_size=2, seed=1,
                                                num_threads=1))
    for _ in range(3):
        x, y = next(a), next(b)
        np.testing.assert_array_equal(x["tokens"], y["tokens"])
        np.testing.assert_array_equal(x["image"], y["image"])
    assert a.get_state() == b.get_state()


def test_worker_processes_read_disjoint_shards_and_resume(caption_dirs, tokenizer):
    root = caption_dirs["root"]
    pre = pipeline.TrainPreprocess(tokenizer.path, image_size=16, max_text_len=32)
    wds_only = [_open(_spec("webdataset", root / "wds"))]

    def stream():
        return pipeline.iterate(pipeline.train_dataset(wds_only, pre, batch_size=2, seed=0,
                                                       num_threads=1, num_workers=2))

    first = stream()
    ids = [next(first)["example_id"].tolist() for _ in range(3)]
    state = first.get_state()
    want = [next(first)["example_id"].tolist() for _ in range(3)]
    first.close()
    flat = [k for batch in ids + want for k in batch]
    assert len(set(flat)) == len(flat)  # 12 of the epoch's 23 good samples, none twice
    resumed = stream()
    resumed.set_state(state)
    assert [next(resumed)["example_id"].tolist() for _ in range(3)] == want
    resumed.close()


# --------------------------------------------------------------------------------------------
# Config and run wiring


def test_stage_a_config_reads_captions_and_needs_no_release(tmp_path):
    from configs import mmrs
    from earthgpt_jax.data import prepare
    from earthgpt_jax.run import _needs_release

    a = mmrs.get_run_config("size=7b,stage=a")
    assert a.data.sources == "coco:~/data/coco:1,webdataset:~/data/laion400m:4"
    assert [(s.kind, s.weight) for s in sources.parse_sources(a.data.sources,
                                                              check_paths=False)] == [
        ("coco", 1.0), ("webdataset", 4.0)]
    assert len(a.data.caption_prompts) >= 2
    assert mmrs.get_run_config("size=13b,stage=b").data.sources == ""
    assert mmrs.get_run_config("demo").data.sources == ""
    a = a.replace(eval={"at_end": False})
    assert not _needs_release(a, str(tmp_path), "train", evaluates_suites=False)
    a = a.replace(data={"sources": a.data.sources + ",mmrs1m:~/mmrs"})
    assert _needs_release(a, str(tmp_path), "train", evaluates_suites=False)
    assert sources.with_release_dir(a).data.manual_dir == os.path.expanduser("~/mmrs")
    # The demo's own tokenizer is trained on MMRS-1M text: caption runs need LLaMA-2's.
    demo = mmrs.get_run_config("demo")
    with pytest.raises(ValueError, match="config.tokenizer.path is empty"):
        prepare.prepare_tokenizer(demo, str(tmp_path), None)
