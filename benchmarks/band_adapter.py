"""Does a 4-band model learn what only NIR shows? A presence question about camouflage nets,
trained from scratch with 3 bands (RGB) and with 4 (band adapter), on the same images.

Data: the synthetic multispectral release (`synthetic.MULTISPECTRAL_SOURCES`: 4-band R, G, B,
NIR TIFFs of vegetation; the nets are invisible in R, G, B and dark in NIR), each image decoded
as training decodes it (`decode_image(bands=N)`, `square_and_resize`). Task: the first question
of each record, "Is there a camouflaged vehicle in this image?", yes or no (balanced). Model: the
real EarthGPT at a preset's size, stage `all`, with the project's optimizer
(`optim.make_optimizer`, its warmup-cosine schedule); the text is fixed token ids (question
tokens, then the answer token), the loss the answer's cross-entropy. With 3 bands the images
carry nothing about the answer (R, G, B are drawn before the nets: tests/test_synthetic.py).

Runs per seed: from scratch with 3 bands; with 4 bands, the adapter starting at R, G, B (the
default: NIR weighs 0) and starting as colour infrared (band_init 3,0,1: NIR, R, G); and a
pretrained-tower case: a model trained with NIR in its first channel, its adapter restarted at
R, G, B and trained alone (everything else frozen).

  JAX_PLATFORMS=cpu PYTHONPATH=. .venv/bin/python benchmarks/band_adapter.py \
      [--size=tiny] [--steps=150] [--out=benchmarks/results/DATE_band_adapter_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

QUESTION_IDS = (11, 12, 13)     # stand-ins for the question's tokens
YES_ID, NO_ID = 21, 22          # the two answers' tokens


def presence_data(root: str, split: str, bands: int, image_size: int):
    """(uint8 [n, S, S, bands] images, int [n] labels 1 = yes) of a multispectral release."""
    from earthgpt_jax.data import synthetic
    from earthgpt_jax.data.images import decode_image, square_and_resize

    src = synthetic.MULTISPECTRAL_SOURCES[0]
    with open(os.path.join(root, synthetic.split_json_path(src.json_path, split))) as f:
        records = json.load(f)
    images, labels = [], []
    for record in records:
        with open(os.path.join(root, record["image"]), "rb") as f:
            pixels = decode_image(f.read(), record["image"], bands=bands)
        images.append(square_and_resize(pixels, image_size))
        labels.append(int(record["conversations"][1]["value"] == "yes"))
    return np.stack(images), np.asarray(labels)


def train_presence(root: str, *, bands: int, size: str = "tiny", steps: int = 60,
                   batch: int = 16, learning_rate: float = 1e-2, seed: int = 0,
                   band_init: str = "", start=None, trainable: str = "all") -> dict:
    """Train on the release at `root` with `bands` input bands, from scratch or from the params
    `start` (a run's "params"; its band adapter restarts from `band_init`), training every
    parameter (`trainable` "all") or the band adapter alone ("band_adapter"). -> held-out
    accuracy before and after, the losses, the adapter's NIR row before and after, params."""
    import jax
    import flax.linen as nn
    import optax

    from earthgpt_jax import optim
    from earthgpt_jax.config import TrainConfig
    from earthgpt_jax.models.earthgpt import EarthGPT
    from earthgpt_jax.models.presets import get_preset

    cfg = get_preset(size, vocab_size=64, input_bands=bands, band_init=band_init)
    model = EarthGPT(cfg)
    train_x, train_y = presence_data(root, "train", bands, cfg.image_size)
    test_x, test_y = presence_data(root, "test", bands, cfg.image_size)
    prompt = np.asarray(QUESTION_IDS, np.int32)

    def text(labels):
        answers = np.where(labels == 1, YES_ID, NO_ID).astype(np.int32)
        tokens = np.concatenate([np.broadcast_to(prompt, (len(labels), prompt.size)),
                                 answers[:, None]], axis=1)
        return tokens, np.ones(tokens.shape, bool)

    tokens, valid = text(train_y[:1])
    params = nn.unbox(jax.jit(model.init)(jax.random.key(seed), train_x[:1], tokens,
                                          valid))["params"]
    if start is not None:  # every part from `start` but a fresh band adapter
        params = {**start, "band_adapter": params["band_adapter"]}
    train_cfg = TrainConfig(stage="all", num_steps=steps, batch_size=batch,
                            learning_rate=learning_rate, warmup_steps=max(1, steps // 10))
    labels = optim.trainable_labels(params, "all")
    if trainable == "band_adapter":
        labels = {k: jax.tree.map(lambda _: "train" if k == "band_adapter" else "freeze", v)
                  for k, v in labels.items()}
    tx = optim.make_optimizer(train_cfg, labels)
    schedule = optim.learning_rate_schedule(train_cfg)
    opt_state = tx.init(params)
    answer = len(QUESTION_IDS)  # logits entry t predicts tokens[:, t]

    def loss_fn(p, images, tokens, valid):
        logits = model.apply({"params": p}, images, tokens, valid)[:, answer]
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, answer]).mean()

    @jax.jit
    def step(p, state, images, tokens, valid, lr):
        loss, grads = jax.value_and_grad(loss_fn)(p, images, tokens, valid)
        updates, state = tx.update(grads, state, p)
        return optax.apply_updates(p, jax.tree.map(lambda u: lr * u, updates)), state, loss

    @jax.jit
    def says_yes(p, images, tokens, valid):
        logits = model.apply({"params": p}, images, tokens, valid)[:, answer]
        return logits[:, YES_ID] > logits[:, NO_ID]

    nir_before = (np.asarray(params["band_adapter"]["band_weights"][3]).tolist()
                  if bands == 4 else None)
    tokens, valid = text(test_y)
    accuracy_before = float(np.mean(np.asarray(says_yes(params, test_x, tokens, valid))
                                    == (test_y == 1)))
    rng = np.random.default_rng(seed)
    losses, t0 = [], time.perf_counter()
    for i in range(steps):
        idx = rng.choice(len(train_y), batch, replace=False)
        tokens, valid = text(train_y[idx])
        params, opt_state, loss = step(params, opt_state, train_x[idx], tokens, valid,
                                       schedule(i))
        losses.append(float(loss))
    tokens, valid = text(test_y)
    predicted = np.asarray(says_yes(params, test_x, tokens, valid))
    return {"bands": bands, "size": size, "steps": steps, "batch": batch,
            "learning_rate": learning_rate, "train_images": int(len(train_y)),
            "test_images": int(len(test_y)),
            "band_init": band_init, "trainable": trainable, "from_start": start is not None,
            "test_accuracy_before": accuracy_before,
            "test_accuracy": float(np.mean(predicted == (test_y == 1))),
            "first_loss": losses[0], "last10_mean_loss": float(np.mean(losses[-10:])),
            "losses": losses, "seconds": time.perf_counter() - t0,
            "nir_row_before": nir_before,
            "nir_row_after": (np.asarray(params["band_adapter"]["band_weights"][3]).tolist()
                              if bands == 4 else None),
            "params": params}


def write_release(root: str, train_images: int, test_images: int, seed: int = 0) -> None:
    from earthgpt_jax.data import synthetic
    synthetic.write_release(root, seed=seed, num_train_images=train_images,
                            num_test_images=test_images,
                            sources=synthetic.MULTISPECTRAL_SOURCES)


def adapter_alone(root: str, *, size: str = "tiny", pretrain_steps: int = 50,
                  steps: int = 40, seed: int = 0) -> tuple[dict, dict]:
    """The pretrained-tower case: a model trained to find the nets in its first tower channel
    (band_init "3,1,2": NIR there), then its band adapter reset to R, G, B (NIR invisible:
    answers at chance) and trained alone, every other weight frozen: it must learn to route NIR
    back in. -> (pretraining run, adapter run)."""
    pretrained = train_presence(root, bands=4, size=size, steps=pretrain_steps,
                                learning_rate=3e-3, band_init="3,1,2", seed=seed)
    adapter = train_presence(root, bands=4, size=size, steps=steps, learning_rate=3e-2,
                             start=pretrained["params"], trainable="band_adapter", seed=seed)
    return pretrained, adapter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--train_images", type=int, default=160)
    parser.add_argument("--test_images", type=int, default=40)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    import jax
    runs = []

    def keep(run, what, seed):
        run = {"what": what, "seed": seed, **{k: v for k, v in run.items() if k != "params"}}
        print(json.dumps({k: v for k, v in run.items() if k != "losses"}), flush=True)
        runs.append(run)

    with tempfile.TemporaryDirectory() as root:
        write_release(root, args.train_images, args.test_images)
        for seed in range(args.seeds):
            for bands, band_init, what in ((3, "", "scratch, 3 bands (R, G, B)"),
                                           (4, "", "scratch, 4 bands, adapter picks R, G, B"),
                                           (4, "3,0,1", "scratch, 4 bands, adapter starts as "
                                                        "colour infrared (NIR, R, G)")):
                keep(train_presence(root, bands=bands, size=args.size, steps=args.steps,
                                    batch=args.batch, learning_rate=3e-3, band_init=band_init,
                                    seed=seed), what, seed)
            pretrained, adapter = adapter_alone(root, size=args.size, seed=seed)
            keep(pretrained, "pretraining: NIR in the first tower channel", seed)
            keep(adapter, "adapter alone on the pretrained model, restarted at R, G, B", seed)
    result = {"what": "held-out yes/no accuracy on a question only NIR answers",
              "command": " ".join(sys.argv), "device": jax.devices()[0].device_kind,
              "args": vars(args), "runs": runs}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
