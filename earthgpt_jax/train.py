"""Sharded training: abstract state via `jax.eval_shape`, sharded init, the jitted train step,
the loop with logging, orbax checkpoints (train state + data-iterator state) and resume.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import flax.linen as nn
from flax import struct, traverse_util

from earthgpt_jax import checkpoints, optim, parallel, plots
from earthgpt_jax.config import DEFAULT_RULES, DataConfig, InitConfig, RunConfig, TrainConfig
from earthgpt_jax.models.earthgpt import EarthGPT, abstract_params, dummy_inputs
from earthgpt_jax.models import flops
from earthgpt_jax.models.presets import EarthGPTConfig, resolve_attention_impl

def batch_shapes(data: DataConfig, model_cfg: EarthGPTConfig, batch: int) -> dict[str, tuple]:
    """{name: (shape, dtype)} of a global batch of `batch` rows, as the train step takes it:
    padded examples, or packed rows (earthgpt_jax/data/packing.py) with `data.packing`."""
    size = model_cfg.image_size
    if data.packing:
        length, slots = data.pack_length, images_per_pack(data, model_cfg)
        return {"image": ((batch, slots, size, size, model_cfg.input_bands), jnp.uint8),
                "tokens": ((batch, length), jnp.int32),
                "segment_ids": ((batch, length), jnp.int32),
                "positions": ((batch, length), jnp.int32),
                "loss_mask": ((batch, length), jnp.float32)}
    length = data.max_text_len
    return {"image": ((batch, size, size, model_cfg.input_bands), jnp.uint8),
            "tokens": ((batch, length), jnp.int32),
            "valid": ((batch, length), jnp.bool_), "loss_mask": ((batch, length), jnp.float32)}


def images_per_pack(data: DataConfig, model_cfg: EarthGPTConfig) -> int:
    """Image slots per packed row: `data.images_per_pack`, or with 0 as many samples as a row
    can ever hold (pack_length // (BOS + visual tokens + 1 text token))."""
    from earthgpt_jax.data.packing import max_samples_per_row
    return (data.images_per_pack or
            max_samples_per_row(data.pack_length, model_cfg.num_visual_tokens))


def packing_options(data: DataConfig, model_cfg: EarthGPTConfig):
    """The pipeline's packing options, or None when packing is off."""
    if not data.packing:
        return None
    from earthgpt_jax.data.packing import PackingOptions
    return PackingOptions(length=data.pack_length, images_per_row=images_per_pack(data, model_cfg),
                          visual_tokens=model_cfg.num_visual_tokens, bos_id=model_cfg.bos_id,
                          bins_per_batch=data.pack_bins)


def executed_flops(train: TrainConfig, data: DataConfig, model_cfg: EarthGPTConfig) -> float:
    """Hardware FLOPs of one train step (padding, blank image slots and remat recompute
    included; the same every step): hardware utilisation's numerator. MFU's counts each
    batch's real samples (`flops.batch_model_flops`)."""
    return flops.executed_train_step_flops(
        model_cfg, train.batch_size, data.max_text_len, train.stage,
        packed_length=data.pack_length if data.packing else None,
        images_per_row=images_per_pack(data, model_cfg) if data.packing else 1,
        loss_chunk=train.loss_chunk)["total"]


def chunked_cross_entropy(head, hidden, targets, chunk: int):
    """Cross-entropy [B, T] of `head(hidden)` [B, T, V] against `targets` [B, T], `chunk`
    positions at a time: only one chunk's logits exist at once, in the backward pass too
    (remat recomputes each chunk's from its hidden states), instead of the whole
    [B, T, vocab] in fp32 plus its gradient."""
    batch, length = hidden.shape[:2]
    n = -(-length // chunk)
    pad = n * chunk - length  # padded positions' losses are computed, then cut off

    def chunks(x):
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return x.reshape((batch, n, chunk) + x.shape[2:]).swapaxes(0, 1)

    @jax.checkpoint
    def one_chunk(args):
        return optax.softmax_cross_entropy_with_integer_labels(head(args[0]), args[1])

    ce = jax.lax.map(one_chunk, (chunks(hidden), chunks(targets)))
    return ce.swapaxes(0, 1).reshape(batch, n * chunk)[:, :length]


@struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


class Trainer:
    """Owns the model, optimizer, mesh and the jitted functions of one training run."""

    def __init__(self, model_cfg: EarthGPTConfig, mesh, train: TrainConfig, data: DataConfig,
                 init: InitConfig = InitConfig(), rules=DEFAULT_RULES):
        if train.batch_size % (train.grad_accum_steps * jax.process_count()):
            raise ValueError(f"config.train.batch_size={train.batch_size} must divide by "
                             f"grad_accum_steps={train.grad_accum_steps} x "
                             f"{jax.process_count()} processes")
        self.train_cfg, self.data_cfg, self.init_cfg = train, data, init
        # `auto` attention becomes this mesh's kernel here, so the FLOP counts below see it.
        impl = resolve_attention_impl(model_cfg.llm.attention_impl,
                                      mesh.devices.flat[0].platform)
        model_cfg = dataclasses.replace(
            model_cfg, llm=dataclasses.replace(model_cfg.llm, attention_impl=impl))
        self.model = EarthGPT(model_cfg)
        self.mesh = mesh
        self.rules = rules
        boxed = abstract_params(self.model)
        self.labels = optim.trainable_labels(nn.unbox(boxed), train.stage)
        self.frozen_dtype = jnp.dtype(train.frozen_param_dtype)
        self.tx = optim.make_optimizer(train, self.labels)
        self.schedule = optim.learning_rate_schedule(train)
        inputs = dummy_inputs(model_cfg, 1, 8)

        def init_boxed(rng):
            params = self.store_frozen(self.model.init(rng, *inputs)["params"])
            return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                              opt_state=self.tx.init(params))

        abstract = jax.eval_shape(init_boxed, jax.random.key(0))
        self.state_shardings = parallel.shardings_for(abstract, mesh, self.rules)
        # The dtypes here (frozen leaves in frozen_param_dtype) are what every restore of this
        # run casts to: config.init.*, resume, evaluation (checkpoints.restore_sharded).
        self.abstract_state = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            nn.unbox(abstract), self.state_shardings)
        self.summary = flops.parameter_summary(self.abstract_state.params, self.labels)
        logging.info("%s", flops.format_summary(self.summary, train.stage))
        # Built once: a jit made per init_state call would compile the whole init again.
        self._init = jax.jit(lambda rng: nn.unbox(init_boxed(rng)),
                             out_shardings=self.state_shardings)
        self.packed = data.packing
        self.batch_shapes = batch_shapes(data, model_cfg, train.batch_size)
        self.batch_shardings = {k: parallel.batch_sharding(mesh, len(shape))
                                for k, (shape, _) in self.batch_shapes.items()}
        # Hardware FLOPs of one step (earthgpt_jax/models/flops.py) and the mesh's datasheet
        # peak: the utilisation the logs report beside MFU (None without a known peak, e.g. CPU).
        self.executed_flops = executed_flops(train, data, model_cfg)
        peak = train.peak_flops_per_device or flops.device_peak_flops(
            mesh.devices.flat[0].device_kind)
        self.peak_flops = peak * mesh.devices.size if peak else None
        # The learning rate is an argument, not a constant of the program: runs that differ
        # only in their schedule (length, warmup, peak) share one compiled step.
        self._train_step = jax.jit(
            self._step, in_shardings=(self.state_shardings, self.batch_shardings,
                                      parallel.replicated(mesh)),
            out_shardings=(self.state_shardings, None), donate_argnums=0)
        self._learning_rates = None
        self._compiled_step = None

    def store_frozen(self, params):
        """`params` (boxed or plain) with the leaves this stage freezes cast to
        train.frozen_param_dtype. Called inside the jitted init, so the fp32 values the
        initialisers draw are temporaries of that program: no fp32 copy of a frozen weight is
        ever a state buffer. Trainable leaves keep their fp32 masters."""
        def cast(label, leaf):
            value = leaf.unbox(apply_constraint=False) if isinstance(
                leaf, nn.meta.AxisMetadata) else leaf
            if label == "train" or not jnp.issubdtype(value.dtype, jnp.floating):
                return leaf
            value = value.astype(self.frozen_dtype)
            return leaf.replace_boxed(value) if isinstance(leaf, nn.meta.AxisMetadata) else value
        # labels' leaves are strings: each lines up with one (boxed) leaf of params
        return jax.tree.map(cast, self.labels, params)

    @classmethod
    def for_run(cls, config: RunConfig, model_cfg: EarthGPTConfig, mesh) -> "Trainer":
        """The trainer of a run's config (its train, data, init and mesh parts)."""
        return cls(model_cfg, mesh, config.train, config.data, config.init, config.mesh.rules)

    def init_state(self, seed: int) -> TrainState:
        """Step 0: random init, sharded as it is created; then the weights config.init names.

        `init.from_workdir` first (every part of that run's latest params), then
        `init.llm|vit|convnext`, which replace their part (and that part is then not read from
        the workdir). The optimizer state is always fresh. Restored leaves go straight onto
        their shardings (`checkpoints.restore_sharded`).
        """
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            state = self._init(jax.random.key(seed))
        restored = self._restore_init()
        if not restored:
            return state
        flat = traverse_util.flatten_dict(state.params)
        flat.update(restored)
        return state.replace(params=traverse_util.unflatten_dict(flat))

    def check_init_sources(self) -> None:
        """The checkpoints config.init names, checked against the model (names and shapes, from
        their metadata; nothing read or compiled): a ValueError naming the tensor that differs."""
        self._restore_init(check_only=True)

    def _restore_init(self, check_only: bool = False) -> dict:
        """{full param path: sharded array} of what config.init names (`init_state`)."""
        named = self.init_cfg.named()
        parts = [p for p in ("llm", "vit", "convnext") if p in named]
        targets = self.abstract_state.params
        restored = {}
        if "from_workdir" in named:
            restored.update(checkpoints.restore_from_workdir(
                named["from_workdir"], targets, skip=parts, check_only=check_only))
        for part in parts:
            restored.update({(part,) + k: v for k, v in checkpoints.restore_part(
                part, named[part], targets[part], check_only=check_only).items()})
        return restored

    def loss_terms(self, params, batch):
        """(numerator, denominator, answer tokens): loss = numerator / denominator.

        Kept as a ratio so gradient accumulation sums numerators and denominators over
        microbatches and gets exactly the full batch's loss.
        """
        chunk = self.train_cfg.loss_chunk
        if self.packed:
            out = self.model.apply({"params": params}, batch["image"], batch["tokens"],
                                   batch["segment_ids"], batch["positions"], bool(chunk),
                                   method=EarthGPT.packed_logits)
            # Entry t predicts token t + 1; placeholders (negative ids) carry no loss weight.
            targets = jnp.maximum(batch["tokens"][:, 1:], 0)
            weights = batch["loss_mask"][:, 1:]
            # Which sample each target belongs to: [B, T, samples per row].
            samples = batch["image"].shape[1]
            membership = (batch["segment_ids"][:, 1:, None]
                          == jnp.arange(1, samples + 1)).astype(weights.dtype)
        else:
            out = self.model.apply({"params": params}, batch["image"], batch["tokens"],
                                   batch["valid"], bool(chunk))
            targets, weights = batch["tokens"], batch["loss_mask"]
            membership = None  # one sample per row
        if chunk:
            def head(hidden):
                return self.model.apply({"params": params}, hidden, method=EarthGPT.head)
            ce = chunked_cross_entropy(head, out, targets, chunk)
        else:
            ce = optax.softmax_cross_entropy_with_integer_labels(out, targets)
        if self.train_cfg.loss_normalization == "examples":
            # Each conversation weighs the same, however long its answers: a one-word answer
            # ("yes") is not drowned by a detection answer of a hundred tokens.
            if membership is None:
                sums, tokens = jnp.sum(ce * weights, axis=1), jnp.sum(weights, axis=1)
            else:
                sums = jnp.einsum("bt,bts->bs", ce * weights, membership)
                tokens = jnp.einsum("bt,bts->bs", weights, membership)
            per_example = sums / jnp.maximum(tokens, 1.0)
            return (jnp.sum(per_example), jnp.sum(tokens > 0).astype(jnp.float32),
                    jnp.sum(weights))
        return jnp.sum(ce * weights), jnp.sum(weights), jnp.sum(weights)

    def split_trainable(self, params) -> tuple[dict, dict]:
        """(trainable, frozen) flat dicts keyed by parameter path, per `self.labels`."""
        flat = traverse_util.flatten_dict(params)
        labels = traverse_util.flatten_dict(self.labels)
        trainable = {k: v for k, v in flat.items() if labels[k] == "train"}
        frozen = {k: v for k, v in flat.items() if labels[k] != "train"}
        return trainable, frozen

    def microbatches(self, batch):
        """The batch as `grad_accum_steps` microbatches, [accum, B / accum, ...], strided:
        microbatch i holds rows i, i + accum, i + 2 accum, ...

        The batch's rows are split contiguously over the data x fsdp devices. A contiguous
        split into microbatches would give microbatch i the rows of a few devices only: XLA
        then either moves rows between devices (collective-permutes) or leaves the others
        idle. Strided, every device holds B / devices / accum rows of every microbatch: the
        split moves no data, and the constraint keeps each microbatch sharded over the batch
        axes like the full batch. (Where B / accum does not divide by the batch shards, each
        microbatch cannot cover every device: XLA places it as it sees fit.) The loss is a
        sum over rows, so the order of rows in microbatches does not change it.
        """
        accum = self.train_cfg.grad_accum_steps
        shards = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        spread = jax.sharding.NamedSharding(
            self.mesh, jax.sharding.PartitionSpec(None, ("data", "fsdp")))

        def split(x):
            x = jnp.swapaxes(x.reshape((x.shape[0] // accum, accum) + x.shape[1:]), 0, 1)
            if x.shape[1] % shards == 0:
                x = jax.lax.with_sharding_constraint(x, spread)
            return x
        return jax.tree.map(split, batch)

    def _grads(self, params, batch):
        """Gradient of the batch loss w.r.t. the trainable parameters only, over
        `grad_accum_steps` sequential microbatches.

        Differentiating only the trainable subset means no weight gradient is ever computed or
        stored for frozen weights: in stage B that is all 7B/13B decoder weights and both towers,
        so the backward pass does activation gradients only (about 4N instead of 6N FLOPs per
        token) and the accumulation carry holds adapter-sized gradients, not a model-sized one.
        """
        accum = self.train_cfg.grad_accum_steps
        trainable, frozen = self.split_trainable(params)

        def numerator(t, b):
            merged = traverse_util.unflatten_dict({**frozen, **t})
            num, den, tokens = self.loss_terms(merged, b)
            return num, (den, tokens)

        numerator_grad = jax.value_and_grad(numerator, has_aux=True)
        if accum == 1:
            (num, (den, tokens)), grads = numerator_grad(trainable, batch)
        else:
            micro = self.microbatches(batch)

            def body(carry, mb):
                (num, (den, tokens)), grads = numerator_grad(trainable, mb)
                return jax.tree.map(jnp.add, carry, (num, den, tokens, grads)), None

            zeros = (0.0, 0.0, 0.0, jax.tree.map(jnp.zeros_like, trainable))
            (num, den, tokens, grads), _ = jax.lax.scan(body, zeros, micro)
        den = jnp.maximum(den, 1.0)
        grads = jax.tree.map(lambda g: g / den, grads)
        grad_norm = optax.tree.norm(grads)
        # The optimizer is a multi_transform over the full tree; frozen leaves get zeros, which
        # its set_to_zero branch never reads (XLA drops them).
        full = traverse_util.unflatten_dict(
            {**{k: jnp.zeros_like(v) for k, v in frozen.items()}, **grads})
        return num / den, tokens, grad_norm, full

    def _step(self, state: TrainState, batch, learning_rate):
        loss, tokens, grad_norm, grads = self._grads(state.params, batch)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        # Numerics guard: a non-finite loss or gradient leaves the state untouched (counted).
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def update(label, p, u):
            if label != "train":  # frozen: the donated buffer passes through, no p + 0 pass
                return p
            # The optimizer's updates are those of a unit learning rate (make_optimizer).
            return jnp.where(finite, (p + learning_rate * u).astype(p.dtype), p)

        params = jax.tree.map(update, self.labels, state.params, updates)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        new_state = TrainState(step=state.step + 1, params=params,
                               opt_state=keep(opt_state, state.opt_state))
        metrics = {"loss": loss, "grad_norm": grad_norm, "tokens": tokens,
                   "learning_rate": learning_rate,
                   "skipped": 1 - finite.astype(jnp.int32)}
        return new_state, metrics

    def learning_rate(self, step: int) -> np.float32:
        """The schedule's rate for the update from `step` (0-based), read from a table computed
        once on the host side: evaluating the schedule on the device every step would wait for
        the step in flight."""
        if self._learning_rates is None or step >= len(self._learning_rates):
            steps = jnp.arange(max(self.train_cfg.num_steps, step) + 1)
            self._learning_rates = np.asarray(jax.device_get(jax.vmap(self.schedule)(steps)),
                                              np.float32)
        return self._learning_rates[step]

    def model_flops(self, host_batch) -> float:
        """Model FLOPs of a step on this host batch (its real samples; MFU's numerator)."""
        local = flops.batch_model_flops(self.model.cfg, self.train_cfg.stage, host_batch)
        return local["total"] * jax.process_count()  # every process holds a like share

    def compile_step(self):
        """The train step compiled from shapes alone, before any array exists: XLA's memory
        analysis of it is what the run needs per device (aot.py, layout.py). A later call with
        arrays of these shapes and shardings reuses the executable."""
        if self._compiled_step is None:
            batch = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=self.batch_shardings[k])
                     for k, (shape, dtype) in self.batch_shapes.items()}
            with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
                self._compiled_step = self._train_step.lower(
                    self.abstract_state, batch, jax.ShapeDtypeStruct((), jnp.float32)).compile()
        return self._compiled_step

    def train_step(self, state, host_batch, step: int):
        """One update from `step` (0-based, the state's step) on a host-local batch."""
        batch = {k: jax.make_array_from_process_local_data(self.batch_shardings[k], host_batch[k])
                 for k in self.batch_shapes}
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            return self._train_step(state, batch, self.learning_rate(step))


class _Preemption:
    """SIGTERM (TPU preemption) asks the loop to save and exit cleanly."""

    def __init__(self):
        self.requested = False
        try:
            signal.signal(signal.SIGTERM, self._handler)
        except ValueError:  # not the main thread (e.g. under some test runners)
            pass

    def _handler(self, signum, frame):
        logging.warning("SIGTERM received: saving a checkpoint and stopping")
        self.requested = True


class MetricsLog:
    """Console line + `metrics.jsonl` + TensorBoard, all from process 0."""

    def __init__(self, workdir: str, total_steps: int, executed_flops: float | None = None,
                 peak_flops: float | None = None):
        self.enabled = jax.process_index() == 0
        self.total_steps = total_steps
        self.executed_flops, self.peak_flops = executed_flops, peak_flops
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.writer = None
        if self.enabled:
            from tensorboardX import SummaryWriter
            self.writer = SummaryWriter(os.path.join(workdir, "tensorboard"))
        self._t0, self._tokens, self._steps = time.time(), 0.0, 0
        self._untimed, self._untimed_since = 0, self._t0

    def exclude_compile(self, steps: int = 1) -> None:
        """Called once the first `steps` steps (which waited for the compile) are done: the
        clock restarts, so the rates and the ETA of the next line leave them out."""
        now = time.time()
        if self.enabled:
            logging.info("Train step compiled; the first step took %.1f s", now - self._t0)
        self._untimed, self._untimed_since, self._t0 = steps, self._t0, now

    def record(self, step: int, history: list[dict]):
        fetched = jax.device_get(history)
        now = time.time()
        elapsed = max(now - self._t0, 1e-9)
        timed, self._untimed = fetched[self._untimed:], 0
        if not timed:  # a line per step: the compile step has only its own time
            timed, elapsed = fetched, max(now - self._untimed_since, 1e-9)
        tokens = float(sum(m["tokens"] for m in timed))
        row = {"step": step,
               "loss": float(np.mean([m["loss"] for m in fetched])),
               "grad_norm": float(np.mean([m["grad_norm"] for m in fetched])),
               "learning_rate": float(fetched[-1]["learning_rate"]),
               "skipped_steps": int(sum(m["skipped"] for m in fetched)),
               "tokens_per_s": tokens / elapsed,
               "steps_per_s": len(timed) / elapsed}
        if all("model_flops" in m for m in timed):  # the loop adds it per batch
            model_per_s = sum(m["model_flops"] for m in timed) / elapsed
            row["model_tflops_per_s"] = model_per_s / 1e12
            if self.peak_flops:
                row["mfu"] = model_per_s / self.peak_flops
                row["hardware_utilization"] = (self.executed_flops * row["steps_per_s"]
                                               / self.peak_flops)
        eta = (self.total_steps - step) / max(row["steps_per_s"], 1e-9)
        self._t0 = now
        if not self.enabled:
            return row
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        for key, value in row.items():
            if key != "step":
                self.writer.add_scalar(f"train/{key}", value, step)
        self.writer.flush()
        mfu = (f"  MFU {100 * row['mfu']:.1f}% (hardware {100 * row['hardware_utilization']:.1f}%)"
               if "mfu" in row else "")
        logging.info("step %d/%d  loss %.4f  grad_norm %.3f  lr %.2e  %.0f tok/s%s  ETA %s",
                     step, self.total_steps, row["loss"], row["grad_norm"],
                     row["learning_rate"], row["tokens_per_s"], mfu, _hms(eta))
        return row

    def close(self):
        if self.writer is not None:
            self.writer.close()


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def train(config: RunConfig, workdir: str, trainer: Trainer, source, preprocess) -> TrainState:
    """Runs (or resumes) training to `config.train.num_steps`; returns the final state."""
    tc = config.train
    parallel.check_batch_divides(tc.batch_size, trainer.mesh)
    # Imported here: the Trainer itself needs no grain (benchmarks/gpu_bench.py drives it with
    # in-memory batches on images that lack grain and TFDS).
    from earthgpt_jax.data import pipeline

    dataset = pipeline.train_dataset(
        source, preprocess, batch_size=tc.batch_size // jax.process_count(),
        seed=config.data.seed, process_index=jax.process_index(),
        process_count=jax.process_count(), num_threads=config.data.num_threads,
        num_workers=config.data.num_workers,
        packing=packing_options(config.data, trainer.model.cfg))
    data_iter = pipeline.iterate(dataset)
    mngr = checkpoints.checkpoint_manager(workdir, config.checkpoint)
    latest = mngr.latest_step()
    if latest is not None:
        restored = mngr.restore(latest, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(trainer.abstract_state),
            data=ocp.args.JsonRestore()))
        state = restored.state
        data_iter.set_state(restored.data)
        logging.info("Resuming from the checkpoint of step %d in %s", latest, mngr.directory)
        # A restarted stage-B run resumes itself; config.init (e.g. from_workdir = stage A)
        # only ever seeds step 0.
        unused = config.init.named()
        if unused:
            logging.info("config.init %s not used: this run resumes its own checkpoint", unused)
    else:
        state = trainer.init_state(config.train.seed)
        logging.info("No checkpoint in %s: starting from step 0", mngr.directory)
    start = int(jax.device_get(state.step))
    log = MetricsLog(workdir, tc.num_steps, trainer.executed_flops, trainer.peak_flops)

    def save(state, step, force=False):
        mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                data=ocp.args.JsonSave(data_iter.get_state())),
                  force=force)

    try:
        state = _loop(config, trainer, state, start, data_iter, log, save, mngr)
    finally:
        # Whatever stopped the loop (an error, Ctrl-C, SIGTERM), a save already started is
        # finished so the newest checkpoint on disk is complete.
        mngr.wait_until_finished()
        mngr.close()
        log.close()
    if jax.process_index() == 0:
        picture = plots.plot_loss_curve(log.path, os.path.join(workdir, "loss.png"))
        if picture:
            logging.info("Loss curve: %s", picture)
    return state


def _loop(config, trainer, state, start, data_iter, log, save, mngr):
    tc = config.train
    preempt = _Preemption()
    history = []
    nonfinite_in_row, previous = 0, None
    for step in range(start + 1, tc.num_steps + 1):
        host_batch = next(data_iter)
        if step == start + 1:
            logging.info("Compiling the train step (the first step waits for it)...")
        state, metrics = trainer.train_step(state, host_batch, step - 1)
        if step == start + 1:  # rates and ETAs count the steps after the compile
            jax.block_until_ready(metrics)
            log.exclude_compile()
        history.append(dict(metrics, model_flops=trainer.model_flops(host_batch)))
        # The previous step's flag: reading it costs no wait, the device is on this step.
        if previous is not None:
            nonfinite_in_row = nonfinite_in_row + 1 if int(previous[1]["skipped"]) else 0
            if nonfinite_in_row >= tc.max_nonfinite_steps_in_row:
                raise FloatingPointError(
                    f"{nonfinite_in_row} steps in a row had a non-finite loss or gradient (all "
                    f"skipped), the last at step {step - 1}; its examples: "
                    f"{[i for i in np.ravel(previous[0]['example_id']) if i]}")
        previous = (host_batch, metrics)
        if step % tc.log_every_steps == 0 or step == tc.num_steps:
            log.record(step, history)
            history = []
        if step % config.checkpoint.every_steps == 0:
            save(state, step)
        if preempt.requested:
            save(state, step, force=True)
            mngr.wait_until_finished()
            logging.info("Saved step %d after SIGTERM; exiting", step)
            raise SystemExit(0)
    if tc.num_steps > start and mngr.latest_step() != tc.num_steps:
        save(state, tc.num_steps, force=True)
    return state
