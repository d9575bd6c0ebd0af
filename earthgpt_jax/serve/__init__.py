"""Web chat with EarthGPT about an image: `python -m earthgpt_jax.serve --ckpt_dir=WORKDIR`.

engine.py: the worker thread that owns the model (queue, batched prefill, round-robin decoding);
service.py: conversations, upload checks, prompts, limits; app.py: the JSON/SSE API
(Starlette); static/: the page;
screenshot.py: drives the page in headless Chromium (tests and the README screenshot);
bench.py: time to first token and tokens/s of a running server, over HTTP.
"""
