"""Training speed, ours vs MaxText (Google's JAX LLM trainer), on this machine's CPU.

  JAX_PLATFORMS=cpu PYTHONPATH=. .venv/bin/python benchmarks/maxtext_side_by_side.py \
      --maxtext_python=/work/maxtext-venv/bin/python

One command, one run. The model on both sides: a text-only LLaMA-2-shaped decoder, vocab 32000,
d_model 512, 4 layers, 8 heads of 64 (MHA), SwiGLU MLP 1376, RMSNorm, RoPE, no biases, untied
embeddings; fp32 weights and activations; batch 8 x 512 tokens; every weight trained with AdamW
(b1 0.9, b2 0.95, eps 1e-8, weight decay 0.1 on every weight, global-norm clip 1.0, linear
warm-up over 10% of the steps then cosine to 10% of --learning_rate: MaxText's defaults, mirrored
on our side); synthetic uniform tokens, next-token cross-entropy over all 512 positions.

- MaxText: its own trainer (`python -m maxtext.trainers.pre_train.train <its base.yml> k=v...`,
  `maxtext_overrides` below) in a subprocess of `--maxtext_python`, with dataset_type=synthetic
  (one fixed random batch) and packing=false (every row one sequence: plain causal attention,
  as ours). Its per-step times are the `seconds:` of its "completed step" log lines (MaxText's
  own measure: time between two steps' dispatches; metrics are fetched one step late, so in
  steady state it is one step's execution time); the gaps between consecutive lines' log
  timestamps (each line is written when that step's metrics are ready) are recorded as a
  cross-check. Its parameter count is the exact integer of the pytree MaxText logs as
  "number parameters: 0.045 billion": a launcher (MAXTEXT_LAUNCHER) wraps
  `max_utils.calculate_num_params_from_pytree` to print it, and changes nothing else.
  No remat: MaxText 0.2.5 wraps every *scanned* layer in jax.checkpoint, and a policy of None
  (remat_policy=full or none) is full recompute there; only unscanned layers with
  remat_policy=none run without remat, so MaxText runs scan_layers=false. Ours runs its
  default, scanned layers (nn.scan) with no remat.
- Ours: `earthgpt_jax.models.llama.LlamaDecoder` (attention_impl "einsum", our CPU default;
  scan_layers=True; remat "none"), embed -> decoder -> fp32 logits -> optax cross-entropy,
  optax.adamw under one jax.jit with donated state, in a subprocess of `--ours_python`
  (default: this interpreter); per-step wall time to `block_until_ready` of the new state and
  loss.

Both sides get the same thread count (`--threads`, default the cores this process may use:
XLA's pool via NPROC, OMP_NUM_THREADS; `train_vs_torch._child_env`). The CPU is shared with
other jobs, so the sides run alternately, `--rounds` rounds of `--warmup` + `--steps` steps
each, in the order ours, MaxText, MaxText, ours, ... (ABBA: a drift of the machine's load
hits both alike). Each run is a fresh process (MaxText's trainer cannot be paused between
steps), so each pays its compile again; warm-up steps, the first of which includes it for ours
and the first of which is after it for MaxText (MaxText compiles ahead of its loop), are
excluded. Reported: median step time over every timed step of every round, tokens/s = batch x
seq / median, the ratio ours/MaxText of tokens/s from those medians (the headline) and per round
(from runs adjacent in time, with their geometric mean: robust to the load changing between
rounds), parameter counts (which must be equal), and each side's loss at its first and last
step (different random inits: only the order of magnitude, ~ln(32000) = 10.4, compares).

--controls adds sides that separate two differences of setup from the code itself:
`ours_unrolled` (ours with unrolled layers, as MaxText runs them) and `ours_on_maxtext_jax` (ours,
scanned, run by --maxtext_python: MaxText's jax/jaxlib/flax versions instead of ours).

Raw JSON: --json (default benchmarks/results/<date>_maxtext_cpu.json); a dated section is
appended to --results.

MaxText's venv (outside this repo; MaxText needs Python >= 3.12, this repo's venv is 3.11),
pinned as measured (MaxText 0.2.5 without its TPU/GPU runtime packages; TensorFlow is not
needed for the synthetic dataset):
  python3.12 -m venv /work/maxtext-venv
  /work/maxtext-venv/bin/pip install --no-deps -r benchmarks/maxtext-requirements.txt
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import results  # noqa: E402
from benchmarks.train_vs_torch import _child_env  # noqa: E402

# The decoder both sides train (MaxText's base.yml key in brackets).
SHAPES = dict(vocab_size=32000,       # vocab_size
              d_model=512,            # base_emb_dim
              num_layers=4,           # base_num_decoder_layers
              num_heads=8,            # base_num_query_heads = base_num_kv_heads
              head_dim=64,            # head_dim
              mlp_dim=1376)           # base_mlp_dim
OPTIMIZER = dict(b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, clip_norm=1.0,
                 warmup_fraction=0.1, final_fraction=0.1)
OURS_VERSIONS = ("jax", "jaxlib", "flax", "optax", "numpy")
MAXTEXT_VERSIONS = ("maxtext", "jax", "jaxlib", "flax", "optax", "numpy")
_MARK = "@@maxtext_side_by_side "  # our protocol lines on a child's stdout


def maxtext_overrides(args, steps: int, workdir: str, run_name: str) -> list[str]:
    """MaxText base.yml overrides: our shapes and training, CPU, nothing else running."""
    s = SHAPES
    return [
        f"run_name={run_name}", f"base_output_directory={workdir}",
        "hardware=cpu", "skip_jax_distributed_system=true",  # one process, no coordinator
        "dataset_type=synthetic", "packing=false", "enable_checkpointing=false",
        "enable_tensorboard=false", "enable_goodput_recording=false",
        f"metrics_file={os.path.join(workdir, run_name + '_metrics.jsonl')}",
        f"steps={steps}", f"per_device_batch_size={args.batch}",
        f"max_target_length={args.seq_len}",
        f"vocab_size={s['vocab_size']}", f"base_emb_dim={s['d_model']}",
        f"base_num_decoder_layers={s['num_layers']}", f"base_num_query_heads={s['num_heads']}",
        f"base_num_kv_heads={s['num_heads']}", f"head_dim={s['head_dim']}",
        f"base_mlp_dim={s['mlp_dim']}",
        "decoder_block=llama2", "mlp_activations=[silu,linear]", "logits_via_embedding=false",
        "dtype=float32", "weight_dtype=float32", "attention=dot_product",
        f"scan_layers={str(args.maxtext_scan_layers).lower()}",
        f"remat_policy={args.maxtext_remat_policy}",
        "opt_type=adamw", f"learning_rate={args.learning_rate}",
        f"adam_b1={OPTIMIZER['b1']}", f"adam_b2={OPTIMIZER['b2']}", f"adam_eps={OPTIMIZER['eps']}",
        f"adam_weight_decay={OPTIMIZER['weight_decay']}",
        f"gradient_clipping_threshold={OPTIMIZER['clip_norm']}",
        f"warmup_steps_fraction={OPTIMIZER['warmup_fraction']}",
        f"learning_rate_final_fraction={OPTIMIZER['final_fraction']}",
        "init_weights_seed=0",
    ] + list(args.maxtext_extra)


# Runs MaxText's trainer unchanged but for one wrapped function, so that the exact parameter
# count (MaxText logs it rounded to 0.001 billion) and the versions reach our log parser.
MAXTEXT_LAUNCHER = r"""
import json, runpy, sys
from importlib import metadata
MARK = sys.argv[1]
versions = {}
for name in sys.argv[2].split(","):
    try:
        versions[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
        versions[name] = "not installed"
print(MARK + json.dumps({"versions": versions}), flush=True)
from maxtext.utils import max_utils
_count = max_utils.calculate_num_params_from_pytree
def _count_and_print(params):
    n = _count(params)
    print(MARK + json.dumps({"params": int(n)}), flush=True)
    return n
max_utils.calculate_num_params_from_pytree = _count_and_print
import maxtext, os
config = os.path.join(os.path.dirname(maxtext.__file__), "configs", "base.yml")
sys.argv = ["maxtext.trainers.pre_train.train", config] + sys.argv[3:]
runpy.run_module("maxtext.trainers.pre_train.train", run_name="__main__", alter_sys=True)
"""

_STEP_LINE = re.compile(r"^I(\d{4}) (\d\d):(\d\d):(\d\d\.\d+) .*completed step: (\d+), "
                        r"seconds: ([0-9.]+),.* loss: ([0-9.naif+-]+)")


def parse_maxtext_log(text: str) -> dict:
    """Per-step seconds, losses and log timestamps of MaxText's 'completed step' lines, and our
    launcher's lines (versions, exact parameter count)."""
    steps, seconds, losses, stamps, info = [], [], [], [], {}
    for line in text.splitlines():
        if line.startswith(_MARK):
            info.update(json.loads(line[len(_MARK):]))
            continue
        m = _STEP_LINE.match(line)
        if m:
            _, hh, mm, ss, step, secs, loss = m.groups()
            steps.append(int(step))
            seconds.append(float(secs))
            losses.append(float(loss))
            stamps.append(int(hh) * 3600 + int(mm) * 60 + float(ss))
    if steps != list(range(len(steps))):
        raise ValueError(f"MaxText's 'completed step' lines are not steps 0..n-1: {steps}")
    # The log's clock wraps at midnight; the gaps are short, so add a day where it went back.
    gaps = [(b - a) % 86400 for a, b in zip(stamps, stamps[1:])]
    return {"step_seconds": seconds, "losses": losses, "log_line_gaps_s": gaps, **info}


def run_maxtext(args, env: dict, workdir: str, run_name: str) -> dict:
    steps = args.warmup + args.steps
    cmd = [args.maxtext_python, "-c", MAXTEXT_LAUNCHER, _MARK, ",".join(MAXTEXT_VERSIONS)]
    cmd += maxtext_overrides(args, steps, workdir, run_name)
    log_path = os.path.join(workdir, run_name + ".log")
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=workdir,
                              timeout=args.timeout)
    wall = time.perf_counter() - start
    with open(log_path) as f:
        text = f.read()
    if proc.returncode != 0:
        raise RuntimeError(f"MaxText exited {proc.returncode}; log {log_path}:\n{text[-4000:]}")
    out = parse_maxtext_log(text)
    if len(out["step_seconds"]) != steps:
        raise RuntimeError(f"MaxText logged {len(out['step_seconds'])} steps, not {steps}; "
                           f"log {log_path}:\n{text[-4000:]}")
    # Full-precision losses from its metrics file (the log prints 3 decimals).
    metrics_path = os.path.join(workdir, run_name + "_metrics.jsonl")
    if os.path.exists(metrics_path):
        with open(metrics_path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        losses = [r.get("learning/loss") for r in rows]
        if len(losses) == steps and all(isinstance(x, (int, float)) for x in losses):
            out["losses"] = [float(x) for x in losses]
    out["wall_s"] = wall
    out["command"] = ["<maxtext_python>", "-m", "maxtext.trainers.pre_train.train",
                      "<maxtext>/configs/base.yml"] + maxtext_overrides(args, steps, "<workdir>",
                                                                        run_name)
    return out


# ----------------------------------------------------------------------------- ours


def llama_config(scan_layers: bool = True):
    """Our LlamaConfig of SHAPES: text-only, scanned layers (default), the CPU default
    attention."""
    from earthgpt_jax.models.presets import LlamaConfig
    s = SHAPES
    if s["d_model"] != s["num_heads"] * s["head_dim"]:
        raise ValueError("our LlamaConfig derives head_dim = hidden_size / num_heads")
    return LlamaConfig(vocab_size=s["vocab_size"], hidden_size=s["d_model"],
                       intermediate_size=s["mlp_dim"], num_layers=s["num_layers"],
                       num_heads=s["num_heads"], num_kv_heads=s["num_heads"],
                       max_position_embeddings=4096, scan_layers=scan_layers,
                       attention_impl="einsum")


def learning_rate_schedule(peak: float, steps: int):
    """MaxText's default schedule (linear warm-up over 10% of the steps from 0, then cosine
    from peak to 10% of it at the last step), in optax."""
    import optax
    warmup = int(steps * OPTIMIZER["warmup_fraction"])
    cos_steps = steps - warmup
    final = peak * OPTIMIZER["final_fraction"]

    def cosine(step):
        import jax.numpy as jnp
        pct = step / (cos_steps - 1) if cos_steps > 1 else 1.0
        a = 0.5 * (jnp.cos(jnp.pi * pct) + 1)
        return peak * a + final * (1 - a)

    if warmup == 0:
        return cosine
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), cosine], [warmup])


def build_ours(batch: int, seq_len: int, learning_rate: float, total_steps: int, seed: int = 0,
               scan_layers: bool = True):
    """(jitted train_step(params, opt_state, tokens) -> (params, opt_state, loss), params,
    opt_state, tokens [batch, seq_len + 1], parameter count). Importable: no subprocess."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import optax

    from earthgpt_jax.models.llama import LlamaDecoder

    cfg = llama_config(scan_layers)
    model = LlamaDecoder(cfg, dtype=jnp.float32, remat_policy="none")
    positions = jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), (batch, seq_len))
    valid = jnp.ones((batch, seq_len), bool)

    def forward(module, inputs):
        logits, _ = module(module.embed(inputs), positions, valid)
        return logits

    key_init, key_data = jax.random.split(jax.random.key(seed))
    # Synthetic tokens as MaxText's: one fixed batch of uniform ids in [0, vocab), seq + 1 long.
    tokens = jax.random.randint(key_data, (batch, seq_len + 1), 0, cfg.vocab_size, jnp.int32)
    params = jax.jit(lambda k: nn.unbox(model.init(k, tokens[:, :-1], method=forward)))(
        key_init)["params"]
    n_params = sum(int(x.size) for x in jax.tree.leaves(params))
    tx = optax.chain(
        optax.clip_by_global_norm(OPTIMIZER["clip_norm"]),
        optax.adamw(learning_rate_schedule(learning_rate, total_steps), b1=OPTIMIZER["b1"],
                    b2=OPTIMIZER["b2"], eps=OPTIMIZER["eps"],
                    weight_decay=OPTIMIZER["weight_decay"]))
    opt_state = jax.jit(tx.init)(params)

    def loss_fn(p, toks):
        logits = model.apply({"params": p}, toks[:, :-1], method=forward)
        return optax.softmax_cross_entropy_with_integer_labels(logits, toks[:, 1:]).mean()

    def train_step(p, o, toks):
        loss, grads = jax.value_and_grad(loss_fn)(p, toks)
        updates, o = tx.update(grads, o, p)
        return optax.apply_updates(p, updates), o, loss

    return jax.jit(train_step, donate_argnums=(0, 1)), params, opt_state, tokens, n_params


def run_ours(batch: int, seq_len: int, learning_rate: float, warmup: int, steps: int,
             scan_layers: bool = True) -> dict:
    """Ours in this process: per-step wall time (compile in the first), losses, params."""
    import jax
    total = warmup + steps
    step_fn, params, opt_state, tokens, n_params = build_ours(
        batch, seq_len, learning_rate, total, scan_layers=scan_layers)
    jax.block_until_ready((params, opt_state))
    seconds, losses = [], []
    for _ in range(total):
        start = time.perf_counter()
        params, opt_state, loss = step_fn(params, opt_state, tokens)
        jax.block_until_ready((params, opt_state, loss))
        seconds.append(time.perf_counter() - start)
        losses.append(float(loss))
    return {"step_seconds": seconds, "losses": losses, "params": n_params,
            "versions": results.versions(OURS_VERSIONS), "devices": str(jax.devices()),
            "python": sys.version.split()[0]}


def run_ours_child(args, env: dict, workdir: str, run_name: str, python: str,
                   scan_layers: bool) -> dict:
    cmd = [python, os.path.abspath(__file__), "--role=ours", f"--batch={args.batch}",
           f"--seq_len={args.seq_len}", f"--learning_rate={args.learning_rate}",
           f"--warmup={args.warmup}", f"--steps={args.steps}",
           f"--ours_scan_layers={scan_layers}"]
    log_path = os.path.join(workdir, run_name + ".log")
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=log, text=True,
                              timeout=args.timeout)
    wall = time.perf_counter() - start
    replies = [json.loads(line[len(_MARK):]) for line in proc.stdout.splitlines()
               if line.startswith(_MARK)]
    if proc.returncode != 0 or not replies:
        with open(log_path) as f:
            raise RuntimeError(f"ours exited {proc.returncode}; log {log_path}:\n"
                               f"{f.read()[-4000:]}")
    return {**replies[-1], "wall_s": wall}


# Sides: "ours" and "maxtext" always; the two controls on request (--controls). Each ours-like
# side: (python, scan_layers, description).
CONTROLS = ("ours_unrolled", "ours_on_maxtext_jax")


def side_setups(args) -> dict:
    setups = {"ours": (args.ours_python, True,
                       "ours: scanned layers, our venv's jax"),
              "maxtext": None}
    if "ours_unrolled" in args.controls:
        setups["ours_unrolled"] = (args.ours_python, False,
                                   "control: ours with unrolled layers (as MaxText runs)")
    if "ours_on_maxtext_jax" in args.controls:
        setups["ours_on_maxtext_jax"] = (args.maxtext_python, True,
                                         "control: ours (scanned) in MaxText's venv (its jax)")
    return setups


# ----------------------------------------------------------------------------- report


def _median(xs):
    return statistics.median(xs) if xs else float("nan")


def summarise(runs: list[dict], args) -> dict:
    tokens = args.batch * args.seq_len
    out = {"sides": {}}
    for side in dict.fromkeys(r["side"] for r in runs):
        mine = [r for r in runs if r["side"] == side]
        timed = [s for r in mine for s in r["step_seconds"][args.warmup:]]
        med = _median(timed)
        entry = {
            "params": sorted({r["params"] for r in mine}),
            "median_step_s": med, "min_step_s": min(timed), "max_step_s": max(timed),
            "timed_steps": len(timed), "tokens_per_step": tokens,
            "tokens_per_s": tokens / med,
            "round_median_step_s": [_median(r["step_seconds"][args.warmup:]) for r in mine],
            "first_step_s": [r["step_seconds"][0] for r in mine],
            "run_wall_s": [r["wall_s"] for r in mine],
            "loss_first_last": [[r["losses"][0], r["losses"][-1]] for r in mine],
            "versions": mine[0]["versions"]}
        if side == "maxtext":
            gaps = [g for r in mine for g in r["log_line_gaps_s"][args.warmup:]]
            entry["log_line_gap_median_s"] = _median(gaps)
        out["sides"][side] = entry
    sides = out["sides"]
    mt_rounds = sides["maxtext"]["round_median_step_s"]
    for side, entry in sides.items():
        # tokens/s ratio from the medians over all rounds (the headline), and per round, from
        # runs next to each other in time (robust to the machine's load changing between
        # rounds), with their geometric mean
        entry["vs_maxtext_tokens_per_s"] = entry["tokens_per_s"] / sides["maxtext"]["tokens_per_s"]
        per_round = [m / o for m, o in zip(mt_rounds, entry["round_median_step_s"])]
        entry["vs_maxtext_per_round"] = per_round
        entry["vs_maxtext_per_round_geomean"] = math.exp(
            sum(math.log(x) for x in per_round) / len(per_round))
    out["ratio_ours_over_maxtext_tokens_per_s"] = sides["ours"]["vs_maxtext_tokens_per_s"]
    out["ratio_ours_over_maxtext_per_round_geomean"] = sides["ours"][
        "vs_maxtext_per_round_geomean"]
    counts = {tuple(e["params"]) for e in sides.values()}
    out["params_equal"] = len(counts) == 1 and len(next(iter(counts))) == 1
    return out


def report_lines(summary: dict, meta: dict) -> list[str]:
    sides = summary["sides"]
    o, m = sides["ours"], sides["maxtext"]
    s = SHAPES
    mv, ov = m["versions"], o["versions"]
    fmt_rounds = lambda xs: ", ".join(f"{1e3 * x:.0f}" for x in xs)  # noqa: E731
    lines = meta["machine_lines"] + [
        f"- MaxText side: maxtext {mv.get('maxtext')}, jax {mv.get('jax')}, jaxlib "
        f"{mv.get('jaxlib')}, flax {mv.get('flax')}, optax {mv.get('optax')} (Python "
        f"{meta['maxtext_python_version']}, `{meta['maxtext_python']}`); ours: jax "
        f"{ov.get('jax')}, flax {ov.get('flax')}, optax {ov.get('optax')}",
        f"- Threads: {meta['threads']} per side (NPROC, OMP_NUM_THREADS); {meta['rounds']} "
        f"rounds, run order {' '.join(meta['order'])}; each run {meta['warmup']} warm-up + "
        f"{meta['steps']} timed steps in a fresh process; medians over all timed steps",
        f"- Model: LLaMA-2-shaped text decoder, vocab {s['vocab_size']}, d {s['d_model']}, "
        f"{s['num_layers']} layers, {s['num_heads']} heads x {s['head_dim']}, SwiGLU "
        f"{s['mlp_dim']}, untied, no bias; fp32; batch {meta['batch']} x {meta['seq_len']} "
        f"tokens; all weights trained, AdamW (lr {meta['learning_rate']:g}, MaxText's "
        f"warm-up + cosine schedule on both sides), synthetic tokens",
        f"- Ours: LlamaDecoder, einsum attention, scanned layers, no remat, optax.adamw under "
        f"jax.jit. MaxText: its pre-train trainer, attention=dot_product, "
        f"scan_layers={str(meta['maxtext_scan_layers']).lower()}, "
        f"remat_policy={meta['maxtext_remat_policy']} (MaxText remats every scanned layer; "
        f"unscanned + none is its only no-remat setup)"]
    for side, setup in meta["setups"].items():
        if side not in ("ours", "maxtext"):
            lines.append(f"- {side}: {setup[2]}, jax {sides[side]['versions'].get('jax')}")
    lines += [
        "- Load average before/after each run (1 min): " + "; ".join(
            f"{r['side']} {r['load_before']:.1f}/{r['load_after']:.1f}" for r in meta["runs"]),
        "",
        "| side | params | median ms/step (min-max) | tokens/s | vs MaxText | per-round "
        "medians ms | per-round vs MaxText (geo. mean) | run wall s | loss first -> last |",
        "|---|---|---|---|---|---|---|---|---|"]
    for name, side in sides.items():
        losses = "; ".join(f"{a:.3f} -> {b:.3f}" for a, b in side["loss_first_last"])
        lines.append(
            f"| {name} | {', '.join(f'{p:,}' for p in side['params'])} | "
            f"{1e3 * side['median_step_s']:.0f} ({1e3 * side['min_step_s']:.0f}-"
            f"{1e3 * side['max_step_s']:.0f}) | {side['tokens_per_s']:.0f} | "
            f"{side['vs_maxtext_tokens_per_s']:.2f}x | "
            f"{fmt_rounds(side['round_median_step_s'])} | "
            f"{', '.join(f'{x:.2f}' for x in side['vs_maxtext_per_round'])} "
            f"({side['vs_maxtext_per_round_geomean']:.2f}x) | "
            f"{', '.join(f'{x:.0f}' for x in side['run_wall_s'])} | {losses} |")
    ratio = summary["ratio_ours_over_maxtext_tokens_per_s"]
    lines += [
        "",
        f"- Ours/MaxText tokens/s: **{ratio:.2f}x** from the medians over all rounds "
        f"({summary['ratio_ours_over_maxtext_per_round_geomean']:.2f}x: geometric mean of the "
        f"rounds' ratios, each from runs adjacent in time); parameters "
        f"{'equal' if summary['params_equal'] else 'DIFFER'} "
        f"(ours {o['params']}, MaxText {m['params']})",
        f"- MaxText's step time is its own logged `seconds` (dispatch to dispatch, metrics one "
        f"step late); the median gap between its 'completed step' log lines, a cross-check, is "
        f"{1e3 * m['log_line_gap_median_s']:.0f} ms. Run wall: the whole process (start-up, "
        f"compile, every step). Losses: different random inits "
        f"and one fixed synthetic batch on each side (memorised quickly); only the start "
        f"(~ln 32000 = 10.4) compares",
        f"- Raw JSON: {meta['json']}"] + ([f"- Note: {meta['note']}"] if meta["note"] else [])
    return lines


def run_benchmark(args) -> tuple[dict, list[str]]:
    machine, machine_lines = results.machine(OURS_VERSIONS), results.machine_lines(
        OURS_VERSIONS[:-1])  # at the start: the load average before any run
    env_ours = _child_env(args.threads, "")
    env_mt = dict(env_ours)
    env_mt.pop("PYTHONPATH", None)  # MaxText's process sees its own packages only
    workdir = args.workdir or tempfile.mkdtemp(prefix="maxtext_side_by_side_")
    os.makedirs(workdir, exist_ok=True)
    setups = side_setups(args)
    order = []
    for r in range(args.rounds):  # ABBA...: a drift in the machine's load hits every side
        order += list(setups) if r % 2 == 0 else list(setups)[::-1]
    runs = []
    try:
        for i, side in enumerate(order):
            load_before = os.getloadavg()[0]
            name = f"{side}_run{i}"
            print(f"[{i + 1}/{len(order)}] {side} ...", flush=True)
            if side == "maxtext":
                run = run_maxtext(args, env_mt, workdir, name)
            else:
                python, scan, _ = setups[side]
                run = run_ours_child(args, env_ours, workdir, name, python, scan)
            run.update(side=side, load_before=load_before, load_after=os.getloadavg()[0])
            runs.append(run)
            timed = run["step_seconds"][args.warmup:]
            print(f"    median {1e3 * _median(timed):.0f} ms/step over {len(timed)} steps, "
                  f"first {run['step_seconds'][0]:.1f} s, loss {run['losses'][0]:.4f} -> "
                  f"{run['losses'][-1]:.4f}, params {run.get('params')}, wall "
                  f"{run['wall_s']:.0f} s", flush=True)
    finally:
        if not args.workdir and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    summary = summarise(runs, args)
    mt_py = subprocess.run([args.maxtext_python, "-c", "import platform; "
                            "print(platform.python_version())"], capture_output=True,
                           text=True).stdout.strip()
    meta = {"command": command_line(args), "threads": args.threads,
            "rounds": args.rounds, "order": order, "warmup": args.warmup, "steps": args.steps,
            "batch": args.batch, "seq_len": args.seq_len, "learning_rate": args.learning_rate,
            "maxtext_python": args.maxtext_python, "maxtext_python_version": mt_py,
            "maxtext_scan_layers": args.maxtext_scan_layers,
            "maxtext_remat_policy": args.maxtext_remat_policy, "setups": setups,
            "runs": [{k: r[k] for k in ("side", "load_before", "load_after")} for r in runs],
            "json": os.path.relpath(args.json, ROOT) if args.json else "(not written)",
            "note": args.note, "machine_lines": machine_lines}
    record = {"benchmark": "maxtext_side_by_side", "command": meta["command"],
              "machine": dict(machine, load_average_end=os.getloadavg()[0]),
              "threads": args.threads,
              "shapes": dict(SHAPES, batch=args.batch, seq_len=args.seq_len, dtype="float32",
                             tokens_per_step=args.batch * args.seq_len),
              "optimizer": dict(OPTIMIZER, learning_rate=args.learning_rate),
              "settings": {k: meta[k] for k in ("rounds", "order", "warmup", "steps",
                                                "maxtext_scan_layers",
                                                "maxtext_remat_policy")},
              "sides": {side: ({"maxtext_python": args.maxtext_python,
                                "maxtext_python_version": mt_py,
                                "trainer": "maxtext.trainers.pre_train.train"} if setup is None
                               else {"python": setup[0], "scan_layers": setup[1],
                                     "description": setup[2],
                                     "model": "earthgpt_jax.models.llama.LlamaDecoder",
                                     "attention_impl": "einsum", "remat_policy": "none",
                                     "optimizer": "optax clip_by_global_norm + adamw, jax.jit"})
                        for side, setup in setups.items()},
              "note": args.note, "summary": summary, "runs": runs}
    return record, report_lines(summary, meta)


def command_line(args) -> str:
    """How this run was started, shell-quoted (a --note has spaces)."""
    return f"python benchmarks/{os.path.basename(__file__)} {shlex.join(args.argv)}".strip()


def _bool(text: str) -> bool:
    return text.lower() in ("1", "true", "yes")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--maxtext_python", default="",
                   help="python of a venv with maxtext installed (required but for --role)")
    p.add_argument("--ours_python", default=sys.executable)
    p.add_argument("--controls", default="",
                   help=f"comma-separated extra sides, each run every round: {', '.join(CONTROLS)}")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--warmup", type=int, default=3,
                   help="untimed steps per run (MaxText's first 2 logged times are dispatch "
                        "only: keep >= 3)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per run")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq_len", type=int, default=512)
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--maxtext_scan_layers", type=_bool, default=False)
    p.add_argument("--maxtext_remat_policy", default="none")
    p.add_argument("--maxtext_extra", nargs="*", default=[],
                   help="further MaxText k=v overrides (appended last)")
    p.add_argument("--ours_scan_layers", type=_bool, default=True, help="internal (--role)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    p.add_argument("--json", default=os.path.join(
        ROOT, "benchmarks", "results",
        f"{datetime.date.today().isoformat()}_maxtext_cpu.json"))
    p.add_argument("--results", default=results.RESULTS,
                   help="markdown file the report is appended to; empty: none")
    p.add_argument("--workdir", default="", help="keep logs here (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the temp workdir")
    p.add_argument("--note", default="", help="a line added to the RESULTS.md section")
    p.add_argument("--role", default="", choices=("", "ours"), help="internal: a child run")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.controls = [c for c in args.controls.split(",") if c]
    unknown = set(args.controls) - set(CONTROLS)
    if unknown:
        p.error(f"unknown --controls {sorted(unknown)}; known: {', '.join(CONTROLS)}")
    if not args.role and not args.maxtext_python:
        p.error("--maxtext_python is required")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.role == "ours":
        out = run_ours(args.batch, args.seq_len, args.learning_rate, args.warmup, args.steps,
                       scan_layers=args.ours_scan_layers)
        print(_MARK + json.dumps(out), flush=True)
        return 0
    record, lines = run_benchmark(args)
    print("\n".join(lines))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)
        print(f"wrote {args.json}")
    if args.results:
        results.append_section("Training speed on CPU: ours vs MaxText",
                               command_line(args), lines, args.results)
        print(f"appended to {args.results}")
    return 0 if record["summary"]["params_equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
