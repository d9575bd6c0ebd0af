"""The paper's evaluation suites through `--mode=eval` (earthgpt_jax.run.run): suites built from
tiny copies of their datasets in the real formats, a randomly initialised tiny model, the
paper-layout results.md / results.json, per-suite predictions and pictures; the clear error for
a suite that is not prepared; ROUGE-L and METEOR against pycocoevalcap; RSVQA's presence
wording."""

import json
import os
import shutil

import orbax.checkpoint as ocp
import pytest

from configs import mmrs
from earthgpt_jax.data import prepare, synthetic
from earthgpt_jax.evaluate import metrics, parsers, runner, suites
from earthgpt_jax.evaluate.report import vqa_question_type
from earthgpt_jax.run import model_config, run
from tests.fixtures import eval_sets
from tests.test_train import tiny_config, one_device_trainer

# Suites built from fixtures (their raw copies go to RAW/<suite>/), with the question count
# each one's test split holds.
BUILT = {"nasc_tg2": (lambda d: eval_sets.scene_folders(d, "nasc_tg2"), 2),
         "rsvqa_hr": (eval_sets.rsvqa_hr, 3),
         "ssdd": (eval_sets.ssdd, 2)}


def _eval_config(work, raw, **eval_overrides):
    config = tiny_config(work)
    return config.replace(eval={
        "batch_size": 4, "max_new_tokens": 6, "suites_manual_dir": raw,
        "suites_max_bad_fraction": 1.0,  # the fixtures hold bad records on purpose
        "suites_data_dir": os.path.join(work, "eval_tfds"), **eval_overrides})


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """A random tiny model saved as step 0, three suites from fixtures (one prepared ahead by the
    command line, two by the run from RAW/), one suite without data, then --mode=eval."""
    work = str(tmp_path_factory.mktemp("suites"))
    raw = os.path.join(work, "raw")
    for name, (write, _) in BUILT.items():
        write(os.path.join(raw, name))
    config = _eval_config(work, raw, suites="nasc_tg2,rsvqa_hr,dior_rsvg,ssdd",
                          skip_missing_suites=True)
    assert suites.main(["--suites=nasc_tg2", f"--manual_dir={raw}", "--max_bad_fraction=1",
                        f"--data_dir={config.eval.suites_data_dir}"]) == 0
    synthetic.write_release(config.data.manual_dir, seed=3, num_train_images=6,
                            num_test_images=2)
    data_dir = prepare.prepare_tfds(config, work)
    tok = prepare.prepare_tokenizer(config, work, prepare.data_source(data_dir, "train"))
    cfg = model_config(config, tok.vocab_size, tok.bos_id)
    # Initialised on one device (the quickest compile); the run restores it onto its own mesh.
    trainer = one_device_trainer(config, cfg)
    with ocp.CheckpointManager(os.path.join(work, "checkpoints")) as mngr:
        mngr.save(0, args=ocp.args.Composite(
            state=ocp.args.StandardSave(trainer.init_state(0))))
    with pytest.MonkeyPatch.context() as patch:
        # Every suite's prompts in one length bucket: one decode compile for the whole run.
        patch.setattr(runner, "PROMPT_BUCKET", 128)
        summary = run(config, work, "eval")
    return work, config, summary


def test_eval_mode_writes_paper_tables_predictions_and_pictures(evaluated, capfd):
    work, _, summary = evaluated
    out = os.path.join(work, "eval")
    md = open(os.path.join(out, "results.md")).read()
    # One section per paper table, a row per paper column with the paper's number beside ours.
    for heading in ("## Scene classification", "## Visual question answering",
                    "## Object detection, SAR and infrared"):
        assert heading in md
    assert "| dataset | column | ours | paper | ours - paper | baseline | n |" in md
    loaded = json.load(open(os.path.join(out, "results.json")))
    assert list(loaded["suites"]) == ["nasc_tg2", "rsvqa_hr", "ssdd"] == list(summary["suites"])
    rows = {(name, r["column"]): r for name, s in loaded["suites"].items() for r in s["rows"]}
    for (name, column), paper in {("nasc_tg2", "accuracy"): 74.72,
                                  ("rsvqa_hr", "Presence"): 62.77,
                                  ("rsvqa_hr", "Comparison"): 79.53,
                                  ("rsvqa_hr", "Avg"): 71.15}.items():
        row = rows[(name, column)]
        assert row["paper"] == paper and 0.0 <= row["ours"] <= 100.0
        dataset = suites.SUITES[name].dataset
        assert f"| {dataset} (zero-shot) | {column} | {row['ours']:.2f} | {paper:.2f} |" in md
    # Ours is the report's figure x 100; the paper's Avg is the mean of its two columns.
    groups = loaded["suites"]["rsvqa_hr"]["results"]["groups"]
    assert rows[("rsvqa_hr", "Presence")]["ours"] == pytest.approx(
        100 * groups["vqa_presence"]["all"]["model"]["accuracy"])
    assert rows[("rsvqa_hr", "Avg")]["ours"] == pytest.approx(
        (rows[("rsvqa_hr", "Presence")]["ours"] + rows[("rsvqa_hr", "Comparison")]["ours"]) / 2)
    # 'Is a parking present?' counts as presence: 2 presence questions, 1 comparison.
    assert (groups["vqa_presence"]["all"]["n"], groups["vqa_comparison"]["all"]["n"]) == (2, 1)
    # Detection: AP per class, shown with the sensor; the paper has no number for it.
    assert rows[("ssdd", "mAP@0.5")]["paper"] is None and rows[("ssdd", "AP@0.5 ship")]
    assert "| SSDD (supervised, sar) | mAP@0.5 |" in md and "| n/r |" in md
    assert "## Paper numbers we do not have" in md and "SSDD mAP@0.5" in md
    # The suite without data is skipped and listed with the command that prepares it.
    assert list(loaded["skipped"]) == ["dior_rsvg"]
    assert "## Suites not evaluated" in md and "--suites=dior_rsvg" in md
    # Per-suite predictions, per-task tables and the detection picture.
    for name, (_, n_questions) in BUILT.items():
        with open(os.path.join(out, name, "predictions.jsonl")) as f:
            lines = [json.loads(line) for line in f]
        assert len(lines) == n_questions
        assert all(isinstance(line["prediction"], str) and line["references"] for line in lines)
        assert os.path.exists(os.path.join(out, name, "results.md"))
    assert [p for p in os.listdir(os.path.join(out, "ssdd")) if p.endswith(".png")]
    assert loaded["step"] == 0


def test_missing_suites_give_one_clear_error(tmp_path):
    """Two suites without data and one whose raw copy has too many bad records (1 of 3 at the
    default 1% threshold): one error naming all three, or all three skipped."""
    eval_sets.scene_folders(str(tmp_path / "raw" / "nasc_tg2"), "nasc_tg2")
    config = _eval_config(str(tmp_path), str(tmp_path / "raw"),
                          suites="dior_rsvg,hit_uav,nasc_tg2", suites_max_bad_fraction=0.01)
    with pytest.raises(suites.SuiteNotPreparedError) as raised:
        suites.open_suites(config, str(tmp_path))
    message = str(raised.value)
    assert message.startswith("3 evaluation suite(s) cannot be evaluated")
    assert "evaluation suite 'nasc_tg2' (scene_folders/nasc_tg2): " in message
    assert "1 of 3 records are bad" in message
    for name in ("dior_rsvg", "hit_uav"):
        assert f"TFDS set {name} is not prepared in {tmp_path / 'eval_tfds'}" in message
        assert f"python -m earthgpt_jax.evaluate.suites --suites={name}" in message
    assert f"{tmp_path / 'raw' / 'dior_rsvg'} does not exist" in message
    assert "Annotations/" in message  # the builder's own download instructions
    config = config.replace(eval={"skip_missing_suites": True})
    opened, skipped = suites.open_suites(config, str(tmp_path))
    assert opened == [] and list(skipped) == ["dior_rsvg", "hit_uav", "nasc_tg2"]
    with pytest.raises(ValueError, match="unknown evaluation suite.*nope"):
        suites.selected_suites("clrs,nope")


def test_config_defaults_name_the_paper_suites():
    assert mmrs.get_run_config().eval.suites == suites.PAPER_SUITES
    assert [s.name for s in suites.selected_suites(suites.PAPER_SUITES)] == \
        suites.PAPER_SUITES.split(",")
    assert mmrs.get_run_config("demo").eval.suites == ""


@pytest.mark.parametrize("question,answer,expected", [
    # Real RSVQA-HR test-set-2 wordings (USGS_split_test_phili_questions.json).
    ("Is a parking present?", "no", "presence"),
    ("Is a grass area on the left of the  commercial building present?", "yes", "presence"),
    ("Is there a parking on the right of a  square residential building?", "no", "presence"),
    ("Is the number of buildings equal to the number of parkings?", "no", "comparison"),
    ("Are there less buildings than large parkings?", "yes", "comparison"),
    ("Are there more grass areas than roads in the image?", "no", "comparison"),
    ("What is the amount of roads?", "8", "count"),
])
def test_rsvqa_question_types(question, answer, expected):
    assert vqa_question_type(question, answer) == expected


def _fixture_captions(tmp_path):
    caps = eval_sets.nwpu_captions(str(tmp_path))["captions"]
    refs = [caps, caps[:3], ["many green trees are around a lake", "a lake beside trees"]]
    preds = ["Caption number 2 of the planes.", "the planes of caption", "A lake near trees."]
    norm = lambda s: " ".join(parsers.simple_tokens(s))  # noqa: E731
    return preds, refs, ({i: [norm(r) for r in rs] for i, rs in enumerate(refs)},
                         {i: [norm(p)] for i, p in enumerate(preds)})


def test_rouge_l_and_meteor_match_pycocoevalcap(tmp_path):
    from pycocoevalcap.rouge.rouge import Rouge

    preds, refs, (gts, res) = _fixture_captions(tmp_path)
    ours = metrics.caption_scores(preds, refs, java_metrics=True)
    assert ours["ROUGE-L"] == pytest.approx(Rouge().compute_score(gts, res)[0])
    assert 0.0 < ours["ROUGE-L"] < 1.0
    if shutil.which("java") is None:
        assert ours["METEOR"] is None and "java not on PATH" in ours["not_computed"]["METEOR"]
        return
    # pycocoevalcap's own METEOR scorer on the same captions (the JVM is started once per
    # process; caption_scores shares it).
    want = metrics._meteor().compute_score(gts, res)[0]
    assert ours["METEOR"] == pytest.approx(want) and 0.0 < want < 1.0


def test_java_metrics_are_skipped_with_a_reason_without_java(tmp_path, monkeypatch):
    preds, refs, _ = _fixture_captions(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path))  # no java on this PATH
    out = metrics.caption_scores(preds, refs, java_metrics=True)
    assert out["METEOR"] is None and out["SPICE"] is None
    assert out["not_computed"]["METEOR"].startswith("java not on PATH")
    assert out["BLEU-4"] is not None and out["ROUGE-L"] is not None
    off = metrics.caption_scores(preds, refs)
    assert off["not_computed"]["METEOR"] == metrics.JAVA_NOT_REQUESTED


def test_suites_cli_names_its_own_option(tmp_path, capsys):
    code = suites.main(["--suites=clrz"])  # no --data_dir: the name is still checked first
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "error: unknown evaluation suite(s) clrz in --suites; known: clrs," in err
    assert "config.eval" not in err
    assert os.listdir(tmp_path) == []
