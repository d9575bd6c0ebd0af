"""The paper's evaluation suites: which TFDS set each one reads, where its data comes from, and
how our figures sit beside the numbers EarthGPT reports.

A suite is a name (`config.eval.suites`, comma-separated) mapped to an evaluation builder of
`tfds_builders` (name[/config]) and split, its task, the paper table it belongs to and that
table's columns, each with the paper's number (shared/research/paper-digest.md §5; `None`
where the paper reports none or it was not recovered). Every figure is on the paper's scale:
percentages, and captioning metrics x 100 (CIDEr 1.926 -> 192.6).

Data: a suite's TFDS set is looked for in `config.eval.suites_data_dir` (empty: the run's TFDS
folder). A set that is not prepared there is prepared from `<config.eval.suites_manual_dir>/
<suite name>/` (the raw download, as the builder's instructions describe) when that folder
exists; otherwise the run stops with the command that prepares it, or, with
`config.eval.skip_missing_suites`, the suite is skipped and listed in results.md. The same
preparation runs on its own:

    python -m earthgpt_jax.evaluate.suites --suites=clrs,ssdd --manual_dir=RAW --data_dir=DIR
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys

from earthgpt_jax.config import PAPER_SUITES  # the paper's tables, in the paper's order
from earthgpt_jax.data.prepare import ReleaseNotFoundError
from earthgpt_jax.evaluate.report import json_default


@dataclasses.dataclass(frozen=True)
class Column:
    """One column of a paper table: our value is `groups[task]['all'][side][metric]` x 100 of
    the report (`report.evaluate_predictions`), or the mean of other columns (`average_of`)."""
    label: str
    task: str
    metric: str
    paper: float | None
    average_of: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Suite:
    name: str
    builder: str          # TFDS builder name[/config] in tfds_builders
    split: str
    task: str             # the records' task; also the paper table the suite belongs to
    sensor: str
    dataset: str          # as the paper names it
    protocol: str         # supervised (train split inside MMRS-1M) or zero-shot
    columns: tuple[Column, ...]
    paper_source: str     # where the paper's numbers were read, or why they are missing


def _cls(name: str, config: str, dataset: str, protocol: str, paper: float | None,
         source: str) -> Suite:
    return Suite(name, f"scene_folders/{config}", "test", "classification", "optical", dataset,
                 protocol, (Column("accuracy", "classification", "accuracy", paper),), source)


def _detection(name: str, builder: str, dataset: str, sensor: str,
               oriented: bool = False, split: str = "test") -> Suite:
    # The digest (§5.5) recovered no SAR or infrared detection table: every paper cell is empty.
    # Oriented-box sets (beyond the paper) add the rotated mAP (DOTA's protocol) first.
    cols = (Column("mAP@0.5", "detection", "mAP@0.5", None),
            Column("precision@0.5", "detection", "precision@0.5", None),
            Column("recall@0.5", "detection", "recall@0.5", None),
            Column("count accuracy", "detection", "count_accuracy", None))
    if oriented:
        cols = (Column("rotated mAP@0.5", "detection", "rotated mAP@0.5", None),) + cols
    return Suite(name, builder, split, "detection", sensor, dataset, "supervised", cols,
                 "not in the paper: oriented boxes are beyond its tasks" if oriented else
                 "not reported: the paper's SAR and infrared detection numbers were not "
                 "recovered (paper-digest.md §5.5)")


_SURVEY = "survey tables [S] (paper-digest.md §5)"
SUITES: dict[str, Suite] = {s.name: s for s in (
    _cls("clrs", "clrs", "CLRS", "zero-shot", 77.37, _SURVEY + ", §5.1"),
    _cls("nasc_tg2", "nasc_tg2", "NaSC-TG2", "zero-shot", 74.72, _SURVEY + ", §5.1"),
    # Not in the default list: without split files its builder puts every image in `test`,
    # and NWPU-RESISC45's images are in MMRS-1M's training data.
    _cls("nwpu_resisc45", "nwpu_resisc45", "NWPU-RESISC45", "supervised", 93.84,
         _SURVEY + ", §5.1"),
    Suite("nwpu_captions", "nwpu_captions", "test", "captioning", "optical", "NWPU-Captions",
          "supervised", tuple(Column(label, "captioning", metric, paper) for label, metric, paper
                              in (("B-1", "BLEU-1", 87.10), ("B-2", "BLEU-2", 78.70),
                                  ("B-3", "BLEU-3", 71.60), ("B-4", "BLEU-4", 65.50),
                                  ("METEOR", "METEOR", 44.50), ("ROUGE-L", "ROUGE-L", 78.20),
                                  ("CIDEr", "CIDEr", 192.60), ("SPICE", "SPICE", 32.20))),
          _SURVEY + ", §5.2"),
    Suite("crsvqa", "crsvqa", "test", "vqa", "optical", "CRSVQA", "supervised",
          (Column("overall accuracy", "vqa", "accuracy", 82.00),),
          "third-party summaries [T] (paper-digest.md §5.3)"),
    # The paper's Avg is the mean of the two columns (62.77 and 79.53 -> 71.15), not the
    # accuracy over all questions.
    Suite("rsvqa_hr", "rsvqa_hr", "test", "vqa", "optical", "RSVQA-HR test set 2", "zero-shot",
          (Column("Presence", "vqa_presence", "accuracy", 62.77),
           Column("Comparison", "vqa_comparison", "accuracy", 79.53),
           Column("Avg", "vqa", "", 71.15, average_of=("Presence", "Comparison"))),
          _SURVEY + ", §5.3"),
    Suite("dior_rsvg", "dior_rsvg", "test", "grounding", "optical", "DIOR-RSVG", "supervised",
          (Column("Pr@0.5", "grounding", "Acc@0.5", 76.65),
           Column("mIoU", "grounding", "mIoU", 69.34),
           Column("cIoU", "grounding", "cIoU", 81.54)),
          "Pr@0.5 from the survey tables [S], mIoU and cIoU from third-party summaries [T] "
          "(paper-digest.md §5.4)"),
    _detection("ssdd", "sar_ships/ssdd", "SSDD", "sar"),
    _detection("hrsid", "sar_ships/hrsid", "HRSID", "sar"),
    _detection("hit_uav", "hit_uav", "HIT-UAV", "infrared"),
    # Oriented boxes, a capability beyond the paper: not in the default list.
    _detection("dota", "dota", "DOTA (patches)", "optical", oriented=True, split="val"),
    _detection("hrsc2016", "hrsc2016", "HRSC2016", "optical", oriented=True),
)}
TABLES = {
    "classification": "Scene classification (paper §5.1; accuracy, %)",
    "captioning": "Image captioning (paper §5.2; metric x 100)",
    "vqa": "Visual question answering (paper §5.3; accuracy, %)",
    "grounding": "Visual grounding (paper §5.4; %)",
    "detection": "Object detection, SAR and infrared (paper §5.5; %)",
}


def selected_suites(names: str, option: str = "config.eval.suites") -> list[Suite]:
    """'clrs, ssdd' -> their Suites, in the order given; an unknown name is an error naming
    the `option` the names came from."""
    picked = [n.strip() for n in (names or "").split(",") if n.strip()]
    unknown = [n for n in picked if n not in SUITES]
    if unknown:
        raise ValueError(f"unknown evaluation suite(s) {', '.join(unknown)} in "
                         f"{option}; known: {', '.join(SUITES)}")
    return [SUITES[n] for n in dict.fromkeys(picked)]


# ----------------------------------------------------------------------------- data

class SuiteNotPreparedError(ReleaseNotFoundError):
    """A suite's dataset is neither prepared nor preparable. (A ReleaseNotFoundError, so
    main.py prints it as one clear error line, as it does for a missing MMRS-1M release.)"""


def suites_data_dir(config, workdir: str) -> str:
    return os.path.abspath(os.path.expanduser(
        config.eval.suites_data_dir or config.data.tfds_dir or os.path.join(workdir, "tfds")))


def prepare_command(suite: Suite, data_dir: str) -> str:
    return (f"python -m earthgpt_jax.evaluate.suites --suites={suite.name} "
            f"--manual_dir=RAW --data_dir={data_dir}   "
            f"# RAW/{suite.name}/ holds the raw download")


def open_suite(suite: Suite, data_dir: str, manual_root: str = "",
               max_bad_fraction: float | None = None, may_prepare: bool = True):
    """The suite's split as a random-access source, preparing the TFDS set from
    `manual_root/<suite name>` first when needed; SuiteNotPreparedError when it cannot."""
    import tensorflow_datasets as tfds

    import tfds_builders  # noqa: F401  (registers the evaluation builders)

    builder = tfds.builder(suite.builder, data_dir=data_dir, max_bad_fraction=max_bad_fraction)
    if not builder.is_prepared():
        manual = os.path.join(os.path.expanduser(manual_root), suite.name) if manual_root else ""
        if not (manual and os.path.isdir(manual) and may_prepare):
            where = (f"{manual} does not exist" if manual and not os.path.isdir(manual) else
                     "this run may not prepare it (several processes)" if manual else
                     "no folder of raw downloads was given (config.eval.suites_manual_dir, "
                     "--manual_dir)")
            raise SuiteNotPreparedError(
                f"evaluation suite {suite.name!r}: TFDS set {suite.builder} is not prepared in "
                f"{data_dir}, and {where}.\nPrepare it from the raw download "
                f"({builder.MANUAL_DOWNLOAD_INSTRUCTIONS.strip()}):\n  "
                f"{prepare_command(suite, data_dir)}\nor pass --config.eval.suites_manual_dir=RAW "
                f"to prepare it in this run, or --config.eval.skip_missing_suites=True to "
                f"evaluate the other suites.")
        logging.info("Preparing %s (%s) from %s into %s", suite.name, suite.builder, manual,
                     data_dir)
        builder.download_and_prepare(
            file_format="array_record",
            download_config=tfds.download.DownloadConfig(manual_dir=manual))
    if suite.split not in builder.info.splits:
        raise SuiteNotPreparedError(
            f"evaluation suite {suite.name!r}: {suite.builder} in {data_dir} has no split "
            f"{suite.split!r} (it has {', '.join(builder.info.splits) or 'none'}); check the "
            f"split files of the raw download and prepare it again.")
    return builder.as_data_source(split=suite.split)


def open_suites(config, workdir: str, skip_missing: bool | None = None,
                may_prepare: bool = True) -> tuple[list[tuple[Suite, object]], dict[str, str]]:
    """The configured suites' sources, [(Suite, source)], and {name: why} for the skipped."""
    ec = config.eval
    skip = ec.skip_missing_suites if skip_missing is None else skip_missing
    data_dir = suites_data_dir(config, workdir)
    opened, failed, errors = [], {}, []
    for suite in selected_suites(ec.suites):
        try:
            opened.append((suite, open_suite(suite, data_dir, ec.suites_manual_dir,
                                             ec.suites_max_bad_fraction, may_prepare)))
        except (FileNotFoundError, ValueError) as e:
            # FileNotFoundError covers SuiteNotPreparedError and a raw folder the builder does
            # not recognise; ValueError a build stopped by its bad-record threshold.
            errors.append(e)
            failed[suite.name] = (str(e) if isinstance(e, SuiteNotPreparedError) else
                                  f"evaluation suite {suite.name!r} ({suite.builder}): {e}")
    if failed and not skip:
        # Every missing suite at once, so one round of preparation fixes them all.
        raise SuiteNotPreparedError(
            f"{len(failed)} evaluation suite(s) cannot be evaluated:\n\n"
            + "\n\n".join(failed.values())) from errors[0]
    for name, message in failed.items():
        logging.warning("Skipping evaluation suite %s: %s", name, message)
    return opened, failed


# ----------------------------------------------------------------------------- the paper tables

def _group(results: dict, task: str) -> dict | None:
    """The report's all-sensor group of `task` (`report.evaluate_predictions`)."""
    return results.get("groups", {}).get(task, {}).get("all")


def _value(suite: Suite, column: Column, results: dict, side: str):
    if column.average_of:
        parts = [_value(suite, c, results, side) for c in suite.columns
                 if c.label in column.average_of]
        return sum(parts) / len(parts) if parts and None not in parts else None
    value = (_group(results, column.task) or {}).get(side, {}).get(column.metric)
    return None if value is None else 100.0 * float(value)


def suite_rows(suite: Suite, results: dict) -> list[dict]:
    """Our figure, the paper's and the blind baseline's for each column of the suite; a
    detection suite adds its per-class AP@0.5."""
    rows = [{"column": c.label, "ours": _value(suite, c, results, "model"), "paper": c.paper,
             "baseline": _value(suite, c, results, "baseline"),
             "n": (_group(results, c.task) or {"n": 0})["n"]}
            for c in suite.columns]
    if suite.task == "detection":
        group = _group(results, "detection") or {}
        base = group.get("baseline", {}).get("per_class_AP") or {}
        for cls, ap in sorted((group.get("model", {}).get("per_class_AP") or {}).items()):
            rows.append({"column": f"AP@0.5 {cls}", "ours": None if ap is None else 100 * ap,
                         "paper": None, "n": group["n"],
                         "baseline": None if base.get(cls) is None else 100 * base[cls]})
    return rows


def _malformed(results: dict, task: str) -> str:
    group = _group(results, task)
    # Detection counts each broken box or group, so the count may exceed the questions.
    return (f"malformed answers {group['n_malformed']} ({group['n']} questions)" if group
            else "no questions scored")


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def paper_tables_markdown(summary: dict) -> str:
    """results.md: one table per paper table, a row per paper column, ours beside the paper's."""
    out = ["# EarthGPT evaluation against the paper\n"]
    if summary.get("step") is not None:
        out.append(f"Checkpoint of step {summary['step']}.\n")
    out.append("All figures in % (captioning: metric x 100), as the paper reports them. "
               "`paper`: EarthGPT's reported number (shared/research/paper-digest.md §5), `n/r` "
               "where none is reported. `baseline`: a blind answer (majority class or answer, "
               "most common caption, mean box; detection: the mean box for every true class) "
               f"with statistics from {summary.get('baseline_source', '-')}.\n")
    for task, title in TABLES.items():
        entries = [(name, s) for name, s in summary["suites"].items() if s["task"] == task]
        if not entries:
            continue
        out += [f"\n## {title}\n", "| dataset | column | ours | paper | ours - paper | baseline "
                "| n |", "|---|---|---|---|---|---|---|"]
        for name, s in entries:
            dataset = f"{s['dataset']} ({s['protocol']}" + (
                f", {s['sensor']})" if task == "detection" else ")")
            for r in s["rows"]:
                diff = None if None in (r["ours"], r["paper"]) else r["ours"] - r["paper"]
                paper = "n/r" if r["paper"] is None else _fmt(r["paper"])
                out.append(f"| {dataset} | {r['column']} | {_fmt(r['ours'])} | {paper} | "
                           f"{_fmt(diff)} | {_fmt(r['baseline'])} | {r['n']} |")
        out.append("")
        out += [f"- {s['dataset']}: {_malformed(s['results'], task)}; paper "
                f"numbers: {s['paper_source']}; predictions in `{name}/predictions.jsonl`, every "
                f"figure in `{name}/results.md`." for name, s in entries]
    skipped = [f"**{name}**: " + why.replace("\n", "\n  ")
               for name, why in (summary.get("skipped") or {}).items()]
    for title, items in (("Paper numbers we do not have", summary.get("missing_paper_numbers")),
                         ("Suites not evaluated", skipped), ("Notes", summary.get("notes"))):
        if items:
            out += [f"\n## {title}\n", *(f"- {item}" for item in items)]
    return "\n".join(out) + "\n"


def suite_summary(per_suite: dict[str, dict], skipped: dict[str, str],
                  step: int | None = None, baseline_source: str = "-") -> dict:
    """The paper-layout rows of every suite plus its full results: results.json's content."""
    summary = {"step": step, "baseline_source": baseline_source, "suites": {},
               "skipped": dict(skipped), "missing_paper_numbers": [], "notes": []}
    for name, results in per_suite.items():
        suite = SUITES[name]
        summary["suites"][name] = {
            "dataset": suite.dataset, "builder": suite.builder, "split": suite.split,
            "task": suite.task, "sensor": suite.sensor, "protocol": suite.protocol,
            "paper_source": suite.paper_source, "rows": suite_rows(suite, results),
            "results": results}
        missing = [c.label for c in suite.columns if c.paper is None]
        if missing:
            summary["missing_paper_numbers"].append(
                f"{suite.dataset} {', '.join(missing)}: {suite.paper_source}")
        summary["notes"] += [n for n in results.get("notes", []) if n not in summary["notes"]]
    return summary


def write_suite_report(per_suite: dict[str, dict], skipped: dict[str, str], out_dir: str,
                       step: int | None = None, baseline_source: str = "-") -> dict:
    """results.md (paper layout) and results.json (`suite_summary`) in out_dir; returns the
    summary."""
    summary = suite_summary(per_suite, skipped, step, baseline_source)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(summary, f, indent=2, default=json_default)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(paper_tables_markdown(summary))
    return summary


# ----------------------------------------------------------------------------- command line

def main(argv=None) -> int:
    """Prepare evaluation sets from their raw downloads (RAW/<suite>/) and say what is ready."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--suites", default=PAPER_SUITES,
                        help=f"comma-separated; known: {', '.join(SUITES)}")
    parser.add_argument("--manual_dir", default="", help="folder holding <suite>/ raw downloads")
    parser.add_argument("--data_dir", help="TFDS folder to prepare into (required)")
    parser.add_argument("--max_bad_fraction", type=float, default=None,
                        help="largest fraction of skipped records per split (builder default)")
    args = parser.parse_args(argv)
    try:
        picked = selected_suites(args.suites, "--suites")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not args.data_dir:  # checked after the names, so a mistyped one is told at once
        parser.error("the following arguments are required: --data_dir")
    logging.basicConfig(level=logging.INFO)
    data_dir = os.path.abspath(os.path.expanduser(args.data_dir))
    failed = 0
    for suite in picked:
        try:
            source = open_suite(suite, data_dir, args.manual_dir, args.max_bad_fraction)
            print(f"{suite.name}: ready ({suite.builder}, split {suite.split}: "
                  f"{len(source)} records)")
        except (FileNotFoundError, ValueError) as e:
            failed += 1
            print(f"{suite.name}: NOT READY: {e}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
