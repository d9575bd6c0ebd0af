"""Evaluation of a trained model on a TFDS split: batched greedy decoding of the first question
of each record, scoring against the record's answers, report + box pictures + predictions."""

from __future__ import annotations

import json
import logging
import os

import jax
import numpy as np
import flax.linen as nn
from tqdm import tqdm

from earthgpt_jax.data.images import decode_image, square_and_resize
from earthgpt_jax.data.pipeline import conversation_turns, record_metadata
from earthgpt_jax.data.tokenizer import Tokenizer, encode_prompt
from earthgpt_jax.evaluate import report
from earthgpt_jax.generate import greedy_generate, left_pad

# Prompts are padded to a multiple of this, so a split compiles a handful of shapes, not one per
# prompt length.
PROMPT_BUCKET = 16
BASELINE_SAMPLE = 5000


def eval_example(record: dict, index: int) -> dict:
    """The scoring view of one record: its first question and the answers to compare with."""
    turns = conversation_turns(record)
    meta = record_metadata(record)
    answers = [t["value"] for t in turns if t["from"] == "gpt"]
    # Caption records hold several reference captions as turns; other tasks ask one thing first.
    references = answers if meta["task"] == "captioning" else answers[:1]
    return meta | {"id": f"{index}:{meta['image_path']}", "question": turns[0]["value"],
                   "references": references}


def baseline_examples(train_source, limit: int = BASELINE_SAMPLE) -> list[dict]:
    """Answer statistics of (a deterministic sample of) the training split, for the baselines."""
    n = len(train_source)
    indices = np.linspace(0, n - 1, num=min(n, limit)).astype(int) if n else []
    return [eval_example(train_source[int(i)], int(i)) for i in indices]


def run_eval(config, workdir: str, model, params, tokenizer: Tokenizer, source, mesh, rules,
             train_source=None) -> dict:
    ec = config.eval
    n = len(source) if not ec.max_examples else min(len(source), ec.max_examples)
    out_dir = os.path.join(workdir, "eval")
    os.makedirs(out_dir, exist_ok=True)
    examples = []
    size = model.cfg.image_size
    progress = tqdm(total=n, desc="eval", unit="example", disable=jax.process_index() != 0)
    for start in range(0, n, ec.batch_size):
        indices = list(range(start, min(start + ec.batch_size, n)))
        records = [source[i] for i in indices]
        batch = [eval_example(r, i) for r, i in zip(records, indices)]
        originals = [decode_image(r["image"], e["image_path"]) for r, e in zip(records, batch)]
        prompts = [encode_prompt(tokenizer, e["question"]) for e in batch]
        # Fixed batch and bucketed length: pad with copies of the last row (dropped after).
        fill = ec.batch_size - len(batch)
        prompts += [prompts[-1]] * fill
        length = -(-max(map(len, prompts)) // PROMPT_BUCKET) * PROMPT_BUCKET
        tokens, valid = left_pad(prompts, tokenizer.pad_id)
        tokens = np.pad(tokens, ((0, 0), (length - tokens.shape[1], 0)),
                        constant_values=tokenizer.pad_id)
        valid = np.pad(valid, ((0, 0), (length - valid.shape[1], 0)))
        images = np.stack([square_and_resize(img, size) for img in originals]
                          + [square_and_resize(originals[-1], size)] * fill)
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            generated = greedy_generate(model, params, images, tokens, valid,
                                        max_new_tokens=ec.max_new_tokens,
                                        eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
        generated = np.asarray(jax.device_get(generated))
        for row, (example, image) in enumerate(zip(batch, originals)):
            example["prediction"] = tokenizer.decode(generated[row])
            example["image"] = image if example["task"] in ("grounding", "detection") else None
            examples.append(example)
        progress.update(len(batch))
    progress.close()
    baselines = report.baselines_from(baseline_examples(train_source)) if train_source else None
    results = report.evaluate_predictions(examples, baselines)
    table = report.write_report(results, out_dir)
    pictures = report.write_box_pictures(examples, out_dir, max_per_task=ec.num_pictures)
    with open(os.path.join(out_dir, "predictions.jsonl"), "w") as f:
        for e in examples:
            f.write(json.dumps({k: v for k, v in e.items() if k != "image"}) + "\n")
    logging.info("Evaluation of %d examples written to %s (%d pictures)", len(examples), out_dir,
                 len(pictures))
    print(table, flush=True)
    return results
