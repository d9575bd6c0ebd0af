"""Web chat with EarthGPT about an image: `python -m earthgpt_jax.serve --ckpt_dir=WORKDIR`.

engine.py: the worker thread that decodes every chat question (queue, batched prefill,
round-robin decoding);
service.py: conversations, upload checks, prompts, limits; scenes.py: whole-scene uploads and
the one background scene job (the CLI's `scene.run_scene`); app.py: the JSON/SSE API
(Starlette); static/: the chat page and the scene page (/scene);
screenshot.py: drives the page in headless Chromium (tests and the README screenshot);
bench.py: time to first token and tokens/s of a running server, over HTTP.
"""
