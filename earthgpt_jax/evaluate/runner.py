"""Evaluation of a trained model on a TFDS split: batched greedy decoding of the first question
of each record, scoring against the record's answers, report + box pictures + predictions;
`run_suites` does the same for each of the paper's suites and writes the paper tables."""

from __future__ import annotations

import collections
import json
import logging
import os

import jax
import numpy as np
from tqdm import tqdm

from earthgpt_jax.data.pipeline import conversation_turns, record_metadata
from earthgpt_jax.evaluate import report
from earthgpt_jax.inference import InferenceSession

# Prompts are padded to a multiple of this, so a split compiles a handful of shapes, not one per
# prompt length.
PROMPT_BUCKET = 16
BASELINE_SAMPLE = 5000


def eval_examples(record: dict, index: int) -> list[dict]:
    """The scoring view of one record: one example per question, with the dialogue so far.

    Caption records hold several reference captions of one image as turns, so they make one
    example whose references are all of them. Other records make one example per turn; turn k
    is asked after turns 0..k-1 with their true answers, as in the training layout, unless the
    record is marked `independent` (VQA sets: one image, many unrelated questions), where
    each question is asked alone.
    """
    turns = conversation_turns(record)
    meta = record_metadata(record)
    pairs = [(turns[i]["value"], turns[i + 1]["value"]) for i in range(0, len(turns) - 1, 2)]
    base = meta | {"record": index}
    if meta["task"] == "captioning":
        return [base | {"id": f"{index}:0", "history": [], "question": pairs[0][0],
                        "references": [a for _, a in pairs]}]
    independent = bool(record.get("independent", False))  # absent in older prepared sets
    return [base | {"id": f"{index}:{k}", "history": [] if independent else pairs[:k],
                    "question": q, "references": [a]} for k, (q, a) in enumerate(pairs)]


def baseline_examples(train_source, limit: int = BASELINE_SAMPLE) -> list[dict]:
    """Answer statistics of (a deterministic sample of) the training split, for the baselines."""
    n = len(train_source)
    indices = np.linspace(0, n - 1, num=min(n, limit)).astype(int) if n else []
    return [e for i in indices for e in eval_examples(train_source[int(i)], int(i))]


def pending_examples(source, max_examples: int = 0) -> list[dict]:
    """Every question of the first `max_examples` records (0: all), gathered before decoding so
    batches are full across record boundaries and a progress bar knows its total."""
    n = len(source) if not max_examples else min(len(source), max_examples)
    return [e for i in range(n) for e in eval_examples(source[i], i)]


def predict(config, session: InferenceSession, source, pending: list[dict], progress
            ) -> list[dict]:
    """Answers to `pending` (filled in as `prediction`; greedy unless config.eval asks for beam
    search or sampling); the few grounding/detection examples that get a picture keep their
    original image as `image`."""
    ec = config.eval
    examples, pictured = [], collections.Counter()
    # Images are decoded per batch: a split's images need not fit in memory.
    for start in range(0, len(pending), ec.batch_size):
        batch = pending[start:start + ec.batch_size]
        originals = [session.decode(source[e["record"]]["image"], e["image_path"])
                     for e in batch]
        # A short last batch repeats its last question: one compiled batch size per split.
        fill = ec.batch_size - len(batch)
        dialogues = [(e["history"], e["question"]) for e in batch]
        tokens, valid = session.prompts(dialogues + dialogues[-1:] * fill, PROMPT_BUCKET)
        images = np.stack([session.pixels(img) for img in originals + originals[-1:] * fill])
        # Greedy unless config.eval asks for beam search or sampling (seeded per batch).
        generated = session.generate(images, tokens, valid, max_new_tokens=ec.max_new_tokens,
                                     beam_width=ec.beam_width, temperature=ec.temperature,
                                     top_p=ec.top_p,
                                     rng=jax.random.key(ec.seed * 1_000_003 + start))
        generated = np.asarray(jax.device_get(generated))
        for row, (example, image) in enumerate(zip(batch, originals)):
            example["prediction"] = session.tokenizer.decode(generated[row])
            group = report.picture_group(example)
            pictured[group] += 1
            keep = (example["task"] in ("grounding", "detection")
                    and pictured[group] <= ec.num_pictures)
            example["image"] = image if keep else None
            examples.append(example)
        progress.update(len(batch))
    return examples


def _progress(total: int, desc: str = "eval"):
    # tqdm's bar shows the rate and the ETA over everything still to decode.
    return tqdm(total=total, desc=desc, unit="question", disable=jax.process_index() != 0)


def run_eval(config, workdir: str, session: InferenceSession, source, train_source=None, *,
             out_dir: str | None = None, pending: list[dict] | None = None, progress=None,
             baselines: dict | None = None, print_table: bool = True) -> dict:
    """Decode, score and write results.json/md, predictions.jsonl and box pictures into
    `out_dir` (default <workdir>/eval). `run_suites` passes its own subfolder, the questions
    it already gathered, the progress bar shared by all suites and baselines computed once."""
    ec = config.eval
    out_dir = out_dir or os.path.join(workdir, "eval")
    os.makedirs(out_dir, exist_ok=True)
    if pending is None:
        pending = pending_examples(source, ec.max_examples)
    own_progress = progress is None
    progress = _progress(len(pending)) if own_progress else progress
    examples = predict(config, session, source, pending, progress)
    if own_progress:
        progress.close()
    if baselines is None and train_source:
        baselines = report.baselines_from(baseline_examples(train_source))
    results = report.evaluate_predictions(examples, baselines, java_metrics=ec.java_metrics)
    if jax.process_index() != 0:
        return results  # every process decoded the same answers (a pod): one writes them
    table = report.write_report(results, out_dir)
    pictures = report.write_box_pictures(examples, out_dir, max_per_task=ec.num_pictures)
    with open(os.path.join(out_dir, "predictions.jsonl"), "w") as f:
        f.writelines(json.dumps({k: v for k, v in e.items() if k not in ("image", "record")})
                     + "\n" for e in examples)
    logging.info("Evaluation of %d questions written to %s (%d pictures)", len(examples),
                 out_dir, len(pictures))
    if print_table:
        print(table, flush=True)
    return results


def run_suites(config, workdir: str, session: InferenceSession, opened, skipped,
               train_source=None) -> dict:
    """`run_eval` over each opened suite [(Suite, source)] into <workdir>/eval/<suite>/, under
    one progress bar, then the paper-layout results.md and results.json (of the session's
    step) in <workdir>/eval/."""
    from earthgpt_jax.evaluate import suites

    out_root = os.path.join(workdir, "eval")
    pending = {s.name: pending_examples(src, config.eval.max_examples) for s, src in opened}
    baselines = report.baselines_from(baseline_examples(train_source)) if train_source else None
    progress = _progress(sum(map(len, pending.values())))
    per_suite = {}
    for suite, source in opened:
        progress.set_description(f"eval {suite.name}")
        per_suite[suite.name] = run_eval(
            config, workdir, session, source, out_dir=os.path.join(out_root, suite.name),
            pending=pending[suite.name], progress=progress, baselines=baselines,
            print_table=False)
    progress.close()
    baseline_source = baselines["source"] if baselines else "each suite's own references"
    if jax.process_index() != 0:  # process 0 writes the tables
        return suites.suite_summary(per_suite, skipped, session.step, baseline_source)
    summary = suites.write_suite_report(per_suite, skipped, out_root, step=session.step,
                                        baseline_source=baseline_source)
    logging.info("Paper tables of %d suites (%d skipped) written to %s", len(per_suite),
                 len(skipped), os.path.join(out_root, "results.md"))
    print(suites.paper_tables_markdown(summary), flush=True)
    return summary
