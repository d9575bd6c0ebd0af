# python main.py --config=configs/mmrs.py --workdir=/path/to/workdir
#   The paper's run on MMRS-1M. Presets are picked by the config argument:
#   configs/mmrs.py:demo              toy model on the generated miniature release (make demo)
#   configs/mmrs.py:size=13b,stage=b  EarthGPT-13B, stage B (unified instruction tuning)
"""EarthGPT on MMRS-1M. Every field can be overridden with --config.<key>=<value>."""

# Logical parameter/activation axes -> mesh axes. FSDP shards the embedding dimension inside a
# slice; tensor parallelism splits heads and MLP; the vision towers are replicated.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
    ("fused", None),
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


def get_config(arg: str = ""):
    # Imported here so DEFAULT_RULES loads without ml_collections (benchmarks/gpu_bench.py runs
    # on bare GPU images that lack it).
    import ml_collections

    args = _parse_arg(arg)
    demo = args.get("preset") == "demo"
    unknown = set(args) - {"preset", "size", "stage"}
    if unknown or args.get("preset") not in (None, "demo"):
        raise ValueError(f"unknown config argument {arg!r}; use 'demo' or 'size=7b|13b,stage=a|b'")

    config = ml_collections.ConfigDict()
    config.model = ml_collections.ConfigDict()
    config.model.size = args.get("size", "demo" if demo else "13b")
    config.model.remat_policy = "none" if demo else "full"
    config.model.dtype = "float32" if demo else "bfloat16"

    config.data = ml_collections.ConfigDict()
    # Where the MMRS-1M release (the directory holding `data/`) lives. For the demo, empty means
    # <workdir>/mini_mmrs1m, generated on first use.
    config.data.manual_dir = "" if demo else "~/tensorflow_datasets/downloads/manual/mmrs1m"
    config.data.synthetic = demo
    # Training sources mixed by weight (earthgpt_jax/data/sources.py): comma-separated
    # KIND:PATH[:WEIGHT], kinds mmrs1m (a release dir), coco (COCO Captions as downloaded),
    # webdataset (img2dataset shards, streamed). Empty: MMRS-1M from manual_dir. Stage A reads
    # captions: the paper mixes LAION-400M and COCO Captions; these weights are ours.
    config.data.sources = ("coco:~/data/coco:1,webdataset:~/data/laion400m:4"
                           if not demo and args.get("stage") == "a" else "")
    # Caption samples become one turn: a prompt picked per sample (hash of its key and the seed)
    # answered by the caption. The paper's prompts are unknown; these are ours, in the style of
    # LLaVA's brief-description prompts.
    config.data.caption_prompts = (
        "Describe the image concisely.",
        "Provide a brief description of the given image.",
        "Write a short caption for the image.",
        "Summarize the visual content of the image.",
        "Give a short and clear explanation of the image.",
        "Describe this image briefly.",
    )
    # Size of the generated miniature release (images per split).
    config.data.synthetic_train_images = 2400
    config.data.synthetic_test_images = 400
    config.data.tfds_dir = ""  # empty: <workdir>/tfds
    config.data.seed = 0
    config.data.max_text_len = 128 if demo else 1024
    config.data.num_threads = 2
    # Worker processes running the input pipeline (decode, resize, tokenise, pack), each with
    # num_threads threads; 0 = threads in the training process only. The 448 px pipeline makes
    # ~60-470 samples/s per 2 cores (benchmarks/), against ~34 one H100 consumes at 7B stage B.
    config.data.num_workers = 0 if demo else 4
    config.data.max_bad_fraction = 0.01
    # Held-out validation slice, chosen by a hash of the image path (the demo has its own test
    # split and keeps every training image).
    config.data.validation_fraction = 0.0 if demo else 0.01
    # File listing evaluation-test images to keep out of training (overlap removal); "" = none.
    config.data.exclude_images = ""
    # Sequence packing (earthgpt_jax/data/packing.py): whole samples, each with its image, share
    # rows of pack_length positions (BOS + visual + text tokens); attention stays inside each
    # sample. A row holds at most images_per_pack samples (image slots the towers encode), and
    # config.train.batch_size then counts rows. pack_bins: rows filled at once (first fit).
    # images_per_pack 0: as many as a row can ever hold, pack_length // (BOS + visual tokens +
    # 1 text token): 7 for 2048 positions and 256 visual tokens (more could never be filled).
    # The demo trains unpacked, one sample per row, as its measured table in the README did.
    config.data.packing = not demo
    config.data.pack_length = 256 if demo else 2048
    config.data.images_per_pack = 4 if demo else 0
    config.data.pack_bins = 64

    config.tokenizer = ml_collections.ConfigDict()
    # A LLaMA-2 tokenizer.model for real runs; the demo trains its own on the training text.
    config.tokenizer.path = ""
    config.tokenizer.vocab_size = 640

    config.train = ml_collections.ConfigDict()
    config.train.stage = "all" if demo else args.get("stage", "b")
    config.train.num_steps = 1300 if demo else 20000
    config.train.batch_size = 16 if demo else 256
    config.train.learning_rate = 2e-3 if demo else 2e-5
    config.train.warmup_steps = 100 if demo else 500
    config.train.end_lr_fraction = 0.05
    # Length of warmup + cosine; 0 means num_steps. Fix it to extend a run without changing
    # the schedule of the steps already taken.
    config.train.lr_decay_steps = 0
    config.train.b1 = 0.9
    config.train.b2 = 0.95
    config.train.weight_decay = 0.0 if demo else 0.05
    config.train.grad_clip_norm = 1.0
    # Microbatches per step (summed gradients): the same update with 1/N of the activations.
    config.train.grad_accum_steps = 1
    # Stop after this many non-finite steps in a row (each one is skipped and counted).
    config.train.max_nonfinite_steps_in_row = 10
    # 'tokens': mean over all answer tokens of the batch; 'examples': mean of per-conversation
    # means, so short answers (classes, yes/no) weigh as much as long detection answers.
    config.train.loss_normalization = "examples" if demo else "tokens"
    config.train.seed = 0
    config.train.log_every_steps = 50 if demo else 10
    # Datasheet bf16 FLOP/s of one device for the logged MFU; 0 = known from the device kind
    # (TPU v4/v5e/v5p/v6e, H100/H200/A100/B200), no MFU where unknown (CPU).
    config.train.peak_flops_per_device = 0.0

    # Converted weights to start from (python -m earthgpt_jax.convert ...): a LLaMA-2 checkpoint
    # from hf-to-orbax, DINOv2 from dinov2-to-orbax, CLIP ConvNeXt from convnext-to-orbax.
    config.init = ml_collections.ConfigDict()
    config.init.llm = ""
    config.init.vit = ""
    config.init.convnext = ""
    # A training workdir to start from (stage B: stage A's): every part of its latest params
    # (decoder, towers, projector, adapters where present) with a fresh optimizer at step 0;
    # parameters it lacks (stage B's adapters after stage A) start as the identity. init.llm/
    # vit/convnext, when also set, replace their part. A checkpoint in this run's own workdir
    # wins over both (a restarted run resumes).
    config.init.from_workdir = ""

    config.checkpoint = ml_collections.ConfigDict()
    config.checkpoint.every_steps = 250 if demo else 1000
    config.checkpoint.keep = 2 if demo else 3

    config.mesh = ml_collections.ConfigDict()
    config.mesh.ici = {"data": 1, "fsdp": -1, "tensor": 1}
    config.mesh.dcn = {"data": -1, "fsdp": 1, "tensor": 1}
    config.mesh.rules = DEFAULT_RULES

    config.distributed = ml_collections.ConfigDict()
    # auto: jax.distributed.initialize() finds the cluster itself (TPU pods; launch_tpu.sh sets
    # it). Otherwise a coordinator address joins a CPU/GPU multi-process run.
    config.distributed.auto = False
    config.distributed.coordinator_address = ""
    config.distributed.num_processes = 1
    config.distributed.process_id = 0

    # --mode=compile: AOT-compile the train step for a TPU topology on this host (needs libtpu).
    config.compile = ml_collections.ConfigDict()
    config.compile.topology = ""  # e.g. v4-32, v5e-64, v5p-128, or a chip grid v5e:4x4
    config.compile.num_slices = 1
    config.compile.report_json = ""

    config.eval = ml_collections.ConfigDict()
    config.eval.at_end = True
    config.eval.split = "test"
    config.eval.batch_size = 32 if demo else 64
    config.eval.max_new_tokens = 120 if demo else 256
    config.eval.max_examples = 0  # 0: the whole split
    # Decoding: greedy (the paper's tables), beam search with beam_width > 1, or top-p sampling
    # with temperature > 0 (seeded by eval.seed and the batch, so a rerun gives the same text).
    config.eval.beam_width = 1
    config.eval.temperature = 0.0
    config.eval.top_p = 1.0
    config.eval.seed = 0
    config.eval.num_pictures = 4
    # The paper's evaluation suites (earthgpt_jax/evaluate/suites.py), comma-separated; empty:
    # the mmrs1m `config.eval.split` instead. --mode=eval writes the paper's tables beside ours.
    config.eval.suites = "" if demo else "clrs,nasc_tg2,nwpu_captions,crsvqa,rsvqa_hr," \
                                         "dior_rsvg,ssdd,hrsid,hit_uav"
    # Where the suites' TFDS sets are prepared; empty: config.data.tfds_dir (or <workdir>/tfds).
    config.eval.suites_data_dir = ""
    # Optional folder holding each suite's raw download as <suite name>/: a set not prepared yet
    # is prepared from it during the run.
    config.eval.suites_manual_dir = ""
    # Largest fraction of skipped records per split when preparing a suite (the builders' 1%).
    config.eval.suites_max_bad_fraction = 0.01
    # False: a suite that is neither prepared nor preparable stops the run with the command
    # that prepares it. True: it is skipped and listed in results.md.
    config.eval.skip_missing_suites = False
    # METEOR and SPICE need Java (pycocoevalcap's jars); skipped with a note when it is absent.
    config.eval.java_metrics = not demo
    return config
