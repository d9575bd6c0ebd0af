# python main.py --config=configs/mmrs.py --workdir=/path/to/workdir
#   The paper's run on MMRS-1M. Presets are picked by the config argument:
#   configs/mmrs.py:demo              toy model on the generated miniature release (make demo)
#   configs/mmrs.py:size=13b,stage=b  EarthGPT-13B, stage B (unified instruction tuning)
"""EarthGPT on MMRS-1M. Every field can be overridden with --config.<key>=<value>.

The fields, their types, defaults and meaning are in earthgpt_jax/config.py (the paper's run);
this file only picks the preset's values that differ.
"""

from earthgpt_jax import config as run_config

# Stage A's caption sources: the paper mixes LAION-400M and COCO Captions; the weights are ours.
STAGE_A_SOURCES = "coco:~/data/coco:1,webdataset:~/data/laion400m:4"

# The demo: a toy model trained from scratch on the generated miniature release, on a CPU, in
# minutes. It trains unpacked, one sample per row, as its measured table in the README did.
DEMO = dict(
    model=dict(size="demo", remat_policy="none", dtype="float32"),
    # Empty manual_dir: <workdir>/mini_mmrs1m, generated on first use. The demo keeps every
    # training image (it has its own test split).
    data=dict(manual_dir="", synthetic=True, max_text_len=128, num_workers=0,
              validation_fraction=0.0, packing=False, pack_length=256, images_per_pack=4),
    train=dict(stage="all", num_steps=1300, batch_size=16, learning_rate=2e-3, warmup_steps=100,
               weight_decay=0.0, loss_normalization="examples", log_every_steps=50),
    checkpoint=dict(every_steps=250, keep=2),
    eval=dict(batch_size=32, max_new_tokens=120, suites="", java_metrics=False),
)


def _parse_arg(arg: str) -> dict:
    """'demo' or 'size=13b,stage=b' -> {'preset': ..., 'size': ..., 'stage': ...}."""
    out = {}
    for part in filter(None, (arg or "").split(",")):
        if "=" in part:
            key, value = part.split("=", 1)
            out[key.strip()] = value.strip()
        else:
            out["preset"] = part.strip()
    return out


def get_run_config(arg: str = "") -> run_config.RunConfig:
    """The typed config of a preset argument ('demo', 'size=7b,stage=a', ...)."""
    args = _parse_arg(arg)
    unknown = set(args) - {"preset", "size", "stage"}
    if unknown or args.get("preset") not in (None, "demo"):
        raise ValueError(f"unknown config argument {arg!r}; use 'demo' or 'size=7b|13b,stage=a|b'")
    if args.get("preset") == "demo":
        return run_config.RunConfig().replace(**DEMO)
    stage = args.get("stage", "b")
    return run_config.RunConfig().replace(
        model={"size": args.get("size", "13b")}, train={"stage": stage},
        data={"sources": STAGE_A_SOURCES if stage == "a" else ""})


def get_config(arg: str = ""):
    import ml_collections

    return ml_collections.ConfigDict(run_config.to_dict(get_run_config(arg)))
