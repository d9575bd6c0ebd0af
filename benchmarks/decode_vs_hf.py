"""Decoding speed: our KV-cached `greedy_generate` vs `transformers` `LlamaForCausalLM.generate`.

Equal work: one EarthGPT whose LLM is a ~134M LLaMA (hidden 768, 12 layers, 12 heads,
intermediate 2048, vocab 32000; tiny vision towers at 128 px pooled to a 16x16 grid = 256 visual
tokens). Every side starts from the same uint8 images and 64 prompt tokens and emits 128 tokens:
  ours       the public `greedy_generate` (vision towers + embedding + prefill + decode loop);
  unrolled   the same after `generate.unrolled_for_decoding` (the serving engine's layout);
  HF         `LlamaForCausalLM.generate` (dynamic KV cache) holding the very same weights
             (converted by `convert.llama.params_to_hf_state`). HF has no model for our vision
             towers, so each HF call first runs our jitted `embed_prompt` (towers + embedding ->
             [BOS] + 256 visual + 64 prompt = 321 vectors) and passes them as `inputs_embeds`;
             that tower work is inside HF's timed calls exactly as it is inside ours;
  HF static  the same `generate` with `cache_implementation="static"` and its forward under
             torch.compile (inductor; `--hf_static=eager` without compiling, `off` to skip).
fp32 everywhere; no EOS (ours: eos_id=-1, HF: eos_token_id=None), so every side emits exactly
128 tokens; the token sequences are compared position by position with HF's (HF's top-2 logit
margins are recorded in a separate, untimed check run).

Times are measured the same way on every side: each is the best of `--repeats` runs, after one
warm-up (which also compiles), with the sides alternating so that load from the other users of
a shared CPU falls on all of them:
  prefill  a call producing only the first token (towers + prefix forward + cache + argmax):
           ours the jitted `generate.prefill`, HF a `generate` call with max_new_tokens=1;
  total    the whole generate call;
  decode   total - prefill: the 127 cached one-token forwards, the argmaxes and the loop.
Compile time is reported apart (ours: XLA; HF static: torch.compile warm-up) and excluded.
The exit status is 1 if any greedy sequence differs from HF's.

  JAX_PLATFORMS=cpu NPROC=16 HF_HUB_OFFLINE=1 PYTHONPATH=. .venv/bin/python \
      benchmarks/decode_vs_hf.py [--batches=1,8] [--repeats=2] [--unrolled] \
      [--hf_static=compiled|eager|off] [--json=PATH] [--no_append]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import time

# torch's OpenMP threads spin while waiting by default; on a shared, oversubscribed CPU that
# burns the cores the other side needs and slows torch itself, so both sides wait passively.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import results  # noqa: E402

# The ~100M decoder the brief asks for; everything else in the model is tiny so the LLM is what
# is being timed.
LLM_100M = dict(vocab_size=32000, hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=12,
                intermediate_size=2048, max_position_embeddings=1024)


def earthgpt_config(image_size: int = 128, grid_size: int = 16, **llm):
    """The `tiny` preset's vision towers with a chosen LLM; grid 16 -> 256 visual tokens."""
    from earthgpt_jax.models.presets import get_preset
    llm = dict(LLM_100M, **llm)
    return get_preset("tiny", vocab_size=llm.pop("vocab_size"), llm=llm, image_size=image_size,
                      grid_size=grid_size)


def init_model(cfg, seed: int = 0):
    """EarthGPT and random fp32 params drawn on the host from the shapes alone: XLA-compiling
    the model's own init (a full forward of both towers) costs more CPU than all of decoding.

    Matrices ~ N(0, 1/fan_in) (Flax's default scale), embeddings N(0, 0.02); vectors named
    scale/weight/gamma ~ U(0.5, 1.5) (random RMSNorm scales: a norm in the wrong place could
    not go unnoticed), other vectors ~ N(0, 0.02).
    """
    import flax.linen as nn
    from earthgpt_jax.models.earthgpt import EarthGPT

    model = EarthGPT(cfg)
    images = jnp.zeros((1, cfg.image_size, cfg.image_size, 3), jnp.uint8)
    tokens = jnp.zeros((1, 4), jnp.int32)
    shapes = jax.eval_shape(lambda key: nn.unbox(model.init(key, images, tokens, tokens > -1)),
                            jax.random.key(seed))["params"]
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        shape = leaf.shape
        if "embedding" in name:
            value = rng.normal(0.0, 0.02, shape)
        elif len(shape) >= 2:
            value = rng.normal(0.0, 1.0, shape) / np.sqrt(np.prod(shape[:-1]))
        elif any(k in name for k in ("scale", "weight", "gamma")):
            value = rng.uniform(0.5, 1.5, shape)
        else:
            value = rng.normal(0.0, 0.02, shape)
        return jnp.asarray(value.astype(leaf.dtype))

    return model, jax.tree_util.tree_map_with_path(draw, shapes)


def hf_model_from(llm_params, llm_cfg):
    """transformers LlamaForCausalLM holding our decoder's weights (fp32, eval mode)."""
    import torch
    import transformers
    from earthgpt_jax.convert.llama import hf_config_from_llama, params_to_hf_state

    hf_cfg = hf_config_from_llama(llm_cfg, dtype="float32", attention_bias=False,
                                  mlp_bias=False, eos_id=None, pad_id=0)
    config = transformers.LlamaConfig(**hf_cfg)
    model = transformers.LlamaForCausalLM(config)
    state = {name: torch.from_numpy(np.array(value, np.float32))
             for name, value in params_to_hf_state(jax.device_get(llm_params), llm_cfg)}
    model.load_state_dict(state, strict=True, assign=True)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.eval()


def make_inputs(cfg, batch: int, prompt_len: int, seed: int = 0):
    rng = np.random.default_rng(seed + batch)
    images = rng.integers(0, 256, (batch, cfg.image_size, cfg.image_size, 3), dtype=np.uint8)
    # Ids from 3 up: never BOS/EOS/pad, so the prompt is plain text.
    tokens = rng.integers(3, cfg.llm.vocab_size, (batch, prompt_len)).astype(np.int32)
    return images, tokens, np.ones((batch, prompt_len), bool)


def ours_runners(model, params, images, tokens, valid, new_tokens: int) -> dict:
    """Compiles our greedy_generate and prefill for these shapes; returns the compile time and
    two zero-argument callables (whole generate -> tokens, prefill alone)."""
    from earthgpt_jax import generate

    args = (params, jnp.asarray(images), jnp.asarray(tokens), jnp.asarray(valid))
    start = time.perf_counter()
    gen = generate.greedy_generate.lower(model, *args, max_new_tokens=new_tokens, eos_id=-1,
                                         pad_id=0).compile()
    pre = generate.prefill.lower(model, *args, max_new_tokens=new_tokens).compile()
    compile_s = time.perf_counter() - start
    return {"compile_s": compile_s, "args": args,
            "generate": lambda: np.asarray(jax.block_until_ready(gen(*args))),
            "prefill": lambda: jax.block_until_ready(pre(*args))}


def hf_runners(hf_model, embed, new_tokens: int, static: bool = False,
               compiled: bool = True) -> dict:
    """HF greedy `generate` from the same images and prompt as ours: `embed` () -> the prefix
    embeddings, by our jitted `embed_prompt` (the vision towers, which HF has no model for),
    timed inside HF's calls as inside ours. Like `ours_runners`: "generate" -> tokens, "check"
    (untimed) -> (tokens, per-step top-2 logit margins), "prefill" (towers + a 1-token
    generate: HF's prefill and first argmax; ours' `generate.prefill` also returns the first
    token). `static`: a StaticCache
    (fixed-shape KV cache) and, with `compiled`, the forward under torch.compile (inductor;
    on CPU transformers compiles only when asked, `_compile_all_devices`)."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList
    from transformers.generation.configuration_utils import CompileConfig

    class Margins(LogitsProcessor):
        def __init__(self):
            self.margins = []

        def __call__(self, input_ids, scores):
            top2 = torch.topk(scores, 2, dim=-1).values
            self.margins.append((top2[:, 0] - top2[:, 1]).numpy().copy())
            return scores

    kwargs = dict(do_sample=False, num_beams=1, use_cache=True, eos_token_id=None,
                  pad_token_id=0)
    if static:
        config = CompileConfig(fullgraph=True, dynamic=False, mode="default")
        config._compile_all_devices = True  # transformers compiles on CPU only when told
        kwargs.update(cache_implementation="static", compile_config=config,
                      disable_compile=not compiled)

    def call(steps, processors=()):
        inputs = torch.from_numpy(np.array(jax.block_until_ready(embed()), np.float32))
        mask = torch.ones(inputs.shape[:2], dtype=torch.long)
        with torch.inference_mode():
            out = hf_model.generate(inputs_embeds=inputs, attention_mask=mask,
                                    max_new_tokens=steps, min_new_tokens=steps,
                                    logits_processor=LogitsProcessorList(processors), **kwargs)
        # With only inputs_embeds, generate returns the new tokens alone.
        return out.numpy()[:, -steps:]

    def check():
        margins = Margins()
        tokens = call(new_tokens, [margins])
        return tokens, np.stack(margins.margins, 1)

    # The timed call has no logits processor: its top-2 per step is work ours does not do.
    return {"generate": lambda: call(new_tokens), "check": check, "prefill": lambda: call(1)}


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def compare_tokens(ours: np.ndarray, hf: np.ndarray, hf_margins: np.ndarray) -> dict:
    """Position-by-position agreement; at each row's first divergence, HF's top-2 logit margin
    (a margin near fp32 noise means a float tie, not a bug)."""
    equal = ours == hf
    first_diff = [int(np.argmin(row)) if not row.all() else None for row in equal]
    margins = {r: float(hf_margins[r, d]) for r, d in enumerate(first_diff) if d is not None}
    return {"all_equal": bool(equal.all()), "equal_positions": int(equal.sum()),
            "positions": int(equal.size),
            "leading_agreement": int(sum(d if d is not None else equal.shape[1]
                                         for d in first_diff)),
            "first_divergence": {r: d for r, d in enumerate(first_diff) if d is not None},
            "margin_at_divergence": margins}


def run_batch(model, params, hf_model, batch: int, prompt_len: int, new_tokens: int,
              repeats: int, unrolled=None, hf_static: str = "compiled") -> dict:
    """Every side is timed the same way from the same images and prompt tokens: "generate"
    (the whole greedy decode) and "prefill" (towers + prefix forward + first token) as
    separate calls, each the best of `repeats`; decode = generate - prefill. Sides: ours,
    `unrolled` ((model, params) from `generate.unrolled_for_decoding`, what the serving engine
    decodes with), HF with its dynamic cache, and HF with a static cache (`hf_static`:
    "compiled" under torch.compile, "eager", or "off")."""
    from earthgpt_jax.models.earthgpt import EarthGPT

    cfg = model.cfg
    images, tokens, valid = make_inputs(cfg, batch, prompt_len)
    embed_fn = jax.jit(functools.partial(model.apply, method=EarthGPT.embed_prompt))
    embed = lambda: embed_fn({"params": params}, jnp.asarray(images), jnp.asarray(tokens))
    prefix_len = int(embed().shape[1])
    sides = {"ours": ours_runners(model, params, images, tokens, valid, new_tokens)}
    if unrolled is not None:
        sides["ours_unrolled"] = ours_runners(*unrolled, images, tokens, valid, new_tokens)
    sides["hf"] = hf_runners(hf_model, embed, new_tokens)
    if hf_static != "off":
        sides["hf_static"] = hf_runners(hf_model, embed, new_tokens, static=True,
                                        compiled=hf_static == "compiled")
    # Warm-up (also the equality check and, for torch.compile, its compile), then the sides
    # alternate so that load from other users of the CPU falls on all of them.
    outputs = {}
    for name, side in sides.items():
        start = time.perf_counter()
        if "check" in side:
            outputs[name] = side["check"]()
            side["generate"]()
        else:
            outputs[name] = side["generate"]()
        side["prefill"]()
        side.setdefault("compile_s", time.perf_counter() - start if name == "hf_static"
                        and hf_static == "compiled" else None)
    totals = {name: [] for name in sides}
    prefills = {name: [] for name in sides}
    for _ in range(repeats):
        for name, side in sides.items():
            totals[name].append(_timed(side["generate"])[0])
            prefills[name].append(_timed(side["prefill"])[0])
    hf_tokens, hf_margins = outputs["hf"]
    row = {"batch": batch, "prefix_len": prefix_len, "new_tokens": new_tokens,
           "check": compare_tokens(outputs["ours"], hf_tokens, hf_margins)}
    if unrolled is not None:
        row["check_unrolled"] = compare_tokens(outputs["ours_unrolled"], hf_tokens, hf_margins)
    if "hf_static" in sides:
        row["check_hf_static"] = compare_tokens(outputs["hf_static"][0], hf_tokens, hf_margins)
    for name, side in sides.items():
        total_s, prefill_s = min(totals[name]), min(prefills[name])
        # Two separately timed calls; at toy sizes the difference can drown in timer noise,
        # and is then reported as not measured (nan) rather than as a huge rate.
        decode_s = total_s - prefill_s if total_s > prefill_s else float("nan")
        row[name] = {
            "prefill_s": prefill_s, "total_s": total_s, "decode_s": decode_s,
            "total_runs_s": totals[name], "prefill_runs_s": prefills[name],
            "compile_s": side["compile_s"],
            # Tokens produced by the decode loop: the first comes out of the prefill.
            "decode_tokens_per_s": batch * (new_tokens - 1) / decode_s,
            "end_to_end_tokens_per_s": batch * new_tokens / total_s,
            "prefill_tokens_per_s": batch * prefix_len / prefill_s,
        }
    for name in ("hf", "hf_static"):
        if name not in row:
            continue
        suffix = "" if name == "hf" else "_static"
        for ours in ("ours", "ours_unrolled"):
            if ours not in row:
                continue
            key = "" if ours == "ours" else "_unrolled"
            o, h = row[ours], row[name]
            row[f"ratio_decode{key}{suffix}"] = (o["decode_tokens_per_s"]
                                                 / h["decode_tokens_per_s"])
            row[f"ratio_end_to_end{key}{suffix}"] = (o["end_to_end_tokens_per_s"]
                                                     / h["end_to_end_tokens_per_s"])
            row[f"ratio_prefill{key}{suffix}"] = h["prefill_s"] / o["prefill_s"]
    return row


def run(batches=(1, 8), prompt_len: int = 64, new_tokens: int = 128, repeats: int = 2,
        cfg=None, unrolled: bool = False, hf_static: str = "compiled", log=print) -> dict:
    import torch

    cfg = cfg or earthgpt_config()
    model, params = init_model(cfg)
    hf_model = hf_model_from(params["llm"], cfg.llm)
    n_llm = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params["llm"]))
    result = {"llm_params": n_llm, "llm": dataclasses.asdict(cfg.llm),
              "visual_tokens": cfg.num_visual_tokens, "prompt_len": prompt_len,
              "torch_threads": torch.get_num_threads(), "hf_static": hf_static, "rows": []}
    if unrolled:
        from earthgpt_jax.generate import unrolled_for_decoding
        unrolled = unrolled_for_decoding(model, params)
    for batch in batches:
        row = run_batch(model, params, hf_model, batch, prompt_len, new_tokens, repeats,
                        unrolled or None, hf_static)
        log(format_row(row))
        result["rows"].append(row)
    return result


def format_row(row: dict) -> str:
    o, h, c = row["ours"], row["hf"], row["check"]
    static = (f"; HF static cache decode {row['hf_static']['decode_tokens_per_s']:.1f} tok/s "
              f"(ours x{row['ratio_decode_static']:.2f})" if "hf_static" in row else "")
    return (f"batch {row['batch']}: decode tok/s ours {o['decode_tokens_per_s']:.1f} "
            f"HF {h['decode_tokens_per_s']:.1f} (x{row['ratio_decode']:.2f}); end-to-end "
            f"ours {o['end_to_end_tokens_per_s']:.1f} HF {h['end_to_end_tokens_per_s']:.1f} "
            f"(x{row['ratio_end_to_end']:.2f}); prefill ours {o['prefill_s']:.3f}s "
            f"HF {h['prefill_s']:.3f}s; compile {o['compile_s']:.1f}s{static}; greedy equal "
            f"{c['equal_positions']}/{c['positions']} (leading {c['leading_agreement']})")


SIDES = {"ours": "ours (JAX)", "ours_unrolled": "ours, unrolled layers",
         "hf": "HF generate", "hf_static": "HF generate, static cache"}
# (our side, HF side, key suffix of run_batch's ratios)
PAIRS = [("ours", "hf", ""), ("ours_unrolled", "hf", "_unrolled"),
         ("ours", "hf_static", "_static"), ("ours_unrolled", "hf_static", "_unrolled_static")]
CHECKS = {"ours": "check", "ours_unrolled": "check_unrolled", "hf_static": "check_hf_static"}


def result_lines(result: dict, target: float = 2.0) -> list[str]:
    llm = result["llm"]
    static = {"compiled": "with the forward under torch.compile (inductor)",
              "eager": "eager"}.get(result.get("hf_static"))
    out = [f"- Model: LLaMA decoder {result['llm_params'] / 1e6:.1f}M params (hidden "
           f"{llm['hidden_size']}, {llm['num_layers']} layers, {llm['num_heads']} heads, "
           f"intermediate {llm['intermediate_size']}, vocab {llm['vocab_size']}), fp32 both "
           f"sides; prefix [BOS] + {result['visual_tokens']} visual + {result['prompt_len']} "
           f"prompt tokens, greedy, no EOS; torch threads {result['torch_threads']} "
           f"(OMP_WAIT_POLICY {os.environ.get('OMP_WAIT_POLICY')})",
           "- Equal work: every side starts from the same images and prompt tokens (HF's "
           "prefix embeddings come from our jitted vision towers + embedding, timed inside "
           "its calls); prefill = a call producing the first token, decode = whole generate "
           "- prefill, on every side; times are the best of "
           f"{result['repeats']} alternating runs after a warm-up"
           + (f"; HF static cache {static}" if static else ""),
           results.load_line(), "",
           f"| batch | side | prefill s | decode s ({result['rows'][0]['new_tokens'] - 1} steps) "
           "| decode tok/s | end-to-end tok/s | compile s |", "|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        for side, label in SIDES.items():
            if side not in row:
                continue
            t = row[side]
            compile_s = "-" if t.get("compile_s") is None else f"{t['compile_s']:.1f}"
            out.append(f"| {row['batch']} | {label} "
                       f"| {t['prefill_s']:.3f} | {t['decode_s']:.3f} "
                       f"| {t['decode_tokens_per_s']:.1f} | {t['end_to_end_tokens_per_s']:.1f} "
                       f"| {compile_s} |")
    out += ["", "| batch | ours vs | decode ours/HF | end-to-end ours/HF | prefill HF/ours |",
            "|---|---|---|---|---|"]
    for row in result["rows"]:
        for ours, hf, key in PAIRS:
            if f"ratio_decode{key}" in row:
                out.append(f"| {row['batch']} | {SIDES[ours]} vs {SIDES[hf]} "
                           f"| {row[f'ratio_decode{key}']:.2f}x "
                           f"| {row[f'ratio_end_to_end{key}']:.2f}x "
                           f"| {row[f'ratio_prefill{key}']:.2f}x |")
    out += ["", "| batch | side | greedy tokens equal to HF generate's | leading agreement |",
            "|---|---|---|---|"]
    for row in result["rows"]:
        for side, check in CHECKS.items():
            if check not in row:
                continue
            c = row[check]
            out.append(f"| {row['batch']} | {SIDES[side]} | {c['equal_positions']}/"
                       f"{c['positions']} | {c['leading_agreement']} |")
            if c["first_divergence"]:
                out.append(f"|  | first divergence (row: step) {c['first_divergence']}, HF "
                           f"top-2 margin there {c['margin_at_divergence']} | | |")
    for row in result["rows"]:
        if row["batch"] == 8:
            refs = [("HF generate", "")] + ([("HF static cache", "_static")]
                                            if "ratio_decode_static" in row else [])
            for name, key in refs:
                ratio = row[f"ratio_decode{key}"]
                out += ["", f"Target decode tokens/s >= {target:g}x {name} at batch 8: "
                        f"{'met' if ratio >= target else 'MISSED'} ({ratio:.2f}x decode, "
                        f"{row[f'ratio_end_to_end{key}']:.2f}x end to end)."]
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--prompt_len", type=int, default=64)
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--unrolled", action="store_true",
                        help="also time ours with generate.unrolled_for_decoding (serving path)")
    parser.add_argument("--hf_static", default="compiled", choices=["compiled", "eager", "off"],
                        help="the second HF reference: generate with a static cache, its "
                        "forward under torch.compile (compiled) or not")
    parser.add_argument("--json", default=time.strftime(
                            "benchmarks/results/%Y-%m-%d_decode_vs_hf_cpu.json", time.gmtime()),
                        help="the raw figures (every run's times), which RESULTS.md quotes")
    parser.add_argument("--no_append", action="store_true", help="print only")
    args = parser.parse_args(argv)
    header = results.machine_lines()
    result = run(batches=tuple(int(b) for b in args.batches.split(",")),
                 prompt_len=args.prompt_len, new_tokens=args.new_tokens, repeats=args.repeats,
                 unrolled=args.unrolled, hf_static=args.hf_static)
    result["repeats"] = args.repeats
    lines = header + result_lines(result)
    print("\n".join(lines))
    if not args.no_append:
        with open(args.json, "w") as f:
            json.dump({"command": results.command_line(__file__, argv),
                       "machine": results.machine(("jax", "jaxlib", "torch", "transformers")),
                       **result}, f, indent=1)
        results.append_section("Decoding: ours vs transformers generate",
                               results.command_line(__file__, argv),
                               lines + ["", f"Raw JSON: {args.json}"])
        print(f"appended to {results.RESULTS}")
    checks = [r[k] for r in result["rows"] for k in CHECKS.values() if k in r]
    return 0 if all(c["all_equal"] for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
