"""The paper's whole recipe, run as the README's "The paper's recipe" section runs it, at tiny size,
each step a separate command as a user types it:

random tiny HF LLaMA, DINOv2 and ConvNeXt -> the three `convert` verbs -> `main.py` stage A on a
COCO and a webdataset fixture -> stage B `--config.init.from_workdir` on a generated MMRS-1M
release -> `--mode=eval` on the paper's suites (fixtures) -> `orbax-to-hf` -> `transformers`
logits equal ours. And: stage B started from stage A with learning rate 0 answers the suites
exactly as stage A does, which holds only if every part (decoder, towers, projector) carried
over and the new adapters start as the identity.

The model is `size=tiny` (the real architecture at the smallest size), in the 7B/13B configs'
own presets otherwise (bf16 compute, full remat, packed rows, scanned layers), with the few
overrides a CPU needs (steps, batch, row length) spelled out below.
"""

import glob
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from earthgpt_jax.data import synthetic
from earthgpt_jax.data.tokenizer import USER_TEMPLATE, train_tokenizer
from tests.fixtures import captions, eval_sets
from tests.fixtures.tiny_hf import tiny_hf_models

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUITES = "nasc_tg2,ssdd"

# What a CPU needs on top of the README's commands: the tiny model, a few small packed rows.
TINY = ["--config.model.size=tiny", "--config.train.batch_size=8",
        "--config.train.warmup_steps=1", "--config.train.log_every_steps=1",
        "--config.checkpoint.every_steps=100", "--config.data.max_text_len=48",
        "--config.data.pack_length=112", "--config.data.images_per_pack=4",
        "--config.data.num_workers=0", "--config.data.validation_fraction=0",
        "--config.eval.batch_size=8", "--config.eval.max_new_tokens=6",
        "--config.eval.java_metrics=false"]


class Journey:
    """Runs commands in sequence from the repository root, as a user would, timing each."""

    def __init__(self, root):
        self.root = root
        self.seconds = {}
        self.env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
                        HF_HUB_OFFLINE="1", TPU_SKIP_MDS_QUERY="1")

    def run(self, name, *args):
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=self.env,
                              capture_output=True, text=True, timeout=600)
        self.seconds[name] = time.perf_counter() - start
        log = os.path.join(self.root, f"{name}.log")
        with open(log, "w") as f:
            f.write(proc.stdout + proc.stderr)
        assert proc.returncode == 0, f"{name} failed:\n{(proc.stdout + proc.stderr)[-4000:]}"
        return proc.stdout + proc.stderr


def _release_texts(release: str) -> list[str]:
    texts = []

    def walk(node):
        if isinstance(node, str):
            texts.append(node)
        elif isinstance(node, dict):
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    for path in glob.glob(os.path.join(release, "data", "json", "**", "*.json"), recursive=True):
        with open(path) as f:
            walk(json.load(f))
    return texts


def _hf_models(root, vocab_size, bos_id, eos_id):
    """Random tiny HF models in the shapes of `get_preset('tiny')`, saved as HF directories."""
    models = tiny_hf_models(vocab_size, max_position_embeddings=512, bos_token_id=bos_id,
                            eos_token_id=eos_id)
    for name, model in models.items():
        model.save_pretrained(os.path.join(root, f"hf_{name}"))


def _predictions(workdir):
    out = {}
    for suite in SUITES.split(","):
        with open(os.path.join(workdir, "eval", suite, "predictions.jsonl")) as f:
            out[suite] = [(row["id"] if "id" in row else i, row["prediction"])
                          for i, row in enumerate(map(json.loads, f))]
    return out


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("recipe"))
    j = Journey(root)
    p = lambda *parts: os.path.join(root, *parts)
    start = time.perf_counter()

    # The user's data: COCO Captions and img2dataset shards (stage A), the MMRS-1M release
    # (stage B), raw downloads of two evaluation suites.
    coco = captions.write_coco(p("coco"), num_images=12, captions_per_image=2)
    shards = captions.write_webdataset(p("laion"), num_shards=2, samples_per_shard=12)
    synthetic.write_release(p("mmrs1m"), seed=5, num_train_images=24, num_test_images=4)
    eval_sets.scene_folders(p("raw", "nasc_tg2"), "nasc_tg2")
    eval_sets.ssdd(p("raw", "ssdd"))
    # LLaMA-2's tokenizer stands in as one trained on this text; the random LLaMA uses its ids.
    texts = [USER_TEMPLATE] + [s.caption for s in coco] + _release_texts(p("mmrs1m"))
    texts += [s.caption for shard in shards.values() for s in shard]
    tok = train_tokenizer(texts, p("tokenizer.model"), vocab_size=400)
    _hf_models(root, tok.vocab_size, tok.bos_id, tok.eos_id)

    # README, "The paper's recipe", step 1: convert the three pre-trained parts.
    j.run("convert_llm", "-m", "earthgpt_jax.convert", "hf-to-orbax",
          f"--hf_dir={p('hf_llama')}", f"--out_dir={p('llama2')}")
    j.run("convert_vit", "-m", "earthgpt_jax.convert", "dinov2-to-orbax",
          f"--hf_dir={p('hf_dinov2')}", f"--out_dir={p('dinov2')}")
    j.run("convert_convnext", "-m", "earthgpt_jax.convert", "convnext-to-orbax",
          f"--weights={p('hf_convnext')}", f"--out_dir={p('convnext')}")

    common = [f"--config.tokenizer.path={p('tokenizer.model')}",
              f"--config.eval.suites={SUITES}", f"--config.eval.suites_manual_dir={p('raw')}",
              f"--config.eval.suites_data_dir={p('eval_tfds')}",
              "--config.eval.suites_max_bad_fraction=1", f"--config.data.tfds_dir={p('tfds')}",
              *TINY]
    # Step 2: stage A on captions, from the converted weights; it answers the suites at its end
    # (the reference for the learning-rate-0 handoff below).
    j.run("stage_a", "main.py", "--config=configs/mmrs.py:size=13b,stage=a",
          f"--workdir={p('stage_a')}", f"--config.init.llm={p('llama2')}",
          f"--config.init.vit={p('dinov2')}", f"--config.init.convnext={p('convnext')}",
          f"--config.data.sources=coco:{p('coco')}:1,webdataset:{p('laion')}:2",
          "--config.train.num_steps=3", "--config.train.learning_rate=1e-3", *common)
    # Step 3: stage B on MMRS-1M, from stage A's run.
    stage_b = ["main.py", "--config=configs/mmrs.py:size=13b,stage=b",
               f"--config.init.from_workdir={p('stage_a')}",
               f"--config.data.manual_dir={p('mmrs1m')}", *common]
    j.run("stage_b", *stage_b, f"--workdir={p('stage_b')}", "--config.train.num_steps=3",
          "--config.train.learning_rate=1e-3", "--config.eval.at_end=false")
    # Step 4: evaluate stage B on the paper's suites.
    j.run("eval_b", *stage_b, f"--workdir={p('stage_b')}", "--mode=eval")
    # Step 5: hand the decoder back as Hugging Face weights, and check the export.
    j.run("export", "-m", "earthgpt_jax.convert", "orbax-to-hf", f"--ckpt_dir={p('stage_b')}",
          f"--out_dir={p('hf_out')}", f"--tokenizer={p('tokenizer.model')}")
    ids = np.random.default_rng(0).integers(3, tok.vocab_size, (2, 24)).astype(np.int32)
    np.save(p("ids.npy"), ids)
    j.run("logits", "-m", "earthgpt_jax.convert", "logits", f"--ckpt_dir={p('stage_b')}",
          f"--ids={p('ids.npy')}", f"--out={p('logits.npy')}")
    # The handoff check: stage B from stage A, learning rate 0, evaluated at its end.
    j.run("stage_b_lr0", *stage_b, f"--workdir={p('stage_b_lr0')}",
          "--config.train.num_steps=2", "--config.train.learning_rate=0")
    j.seconds["total"] = time.perf_counter() - start
    with open(p("seconds.json"), "w") as f:
        json.dump(j.seconds, f, indent=2)
    print("recipe step seconds:", json.dumps({k: round(v, 1) for k, v in j.seconds.items()}))
    return {"root": root, "p": p, "ids": ids, "seconds": j.seconds}


def _log(recipe, name):
    with open(recipe["p"](f"{name}.log")) as f:
        return f.read()


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_stage_a_trains_on_both_caption_sources(recipe):
    p = recipe["p"]
    rows = _metrics(p("stage_a"))
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in rows)
    # The converted weights were loaded, and the mixture's state (both sources) is checkpointed.
    log = _log(recipe, "stage_a")
    for part in ("llm", "vit", "convnext"):
        assert f"Loaded {part} weights" in log
    state = ""
    for path in glob.glob(p("stage_a", "checkpoints", "3", "data", "*")):
        with open(path, errors="replace") as f:
            state += f.read()
    assert "coco:" in state and "webdataset:" in state


def test_stage_b_starts_from_stage_a_and_lists_the_new_adapters(recipe):
    log = _log(recipe, "stage_b")
    assert "Started from" in log and "stage_a" in log
    assert "adapter_scale" in log and "keep their usual init" in log
    rows = _metrics(recipe["p"]("stage_b"))
    assert [r["step"] for r in rows] == [1, 2, 3]


def test_eval_writes_the_paper_tables(recipe):
    p = recipe["p"]
    with open(p("stage_b", "eval", "results.json")) as f:
        results = json.load(f)
    text = json.dumps(results)
    for suite in SUITES.split(","):
        assert suite in text
        assert os.path.exists(p("stage_b", "eval", suite, "predictions.jsonl"))


def test_exported_weights_give_our_logits_in_transformers(recipe):
    p = recipe["p"]
    hf = transformers.LlamaForCausalLM.from_pretrained(p("hf_out"), torch_dtype=torch.float32)
    with torch.no_grad():
        theirs = hf(torch.tensor(recipe["ids"], dtype=torch.long)).logits.numpy()
    ours = np.load(p("logits.npy"))
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)
    # Stage B trained its adapters, so the export really carries them (merged into the linears).
    base = transformers.LlamaForCausalLM.from_pretrained(p("hf_llama"), torch_dtype=torch.float32)
    with torch.no_grad():
        original = base(torch.tensor(recipe["ids"], dtype=torch.long)).logits.numpy()
    assert np.abs(original - theirs).max() > 1e-3


def test_stage_b_at_learning_rate_0_answers_as_stage_a(recipe):
    p = recipe["p"]
    a, b = _predictions(p("stage_a")), _predictions(p("stage_b_lr0"))
    assert sum(map(len, a.values())) >= 3
    assert a == b
