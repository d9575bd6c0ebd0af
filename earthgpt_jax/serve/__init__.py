"""Web chat with EarthGPT about an image: `python -m earthgpt_jax.serve --ckpt_dir=WORKDIR`.

engine.py: the worker thread that decodes every chat question; service.py: conversations,
upload checks, prompts, limits; scenes.py: whole scenes and the one background scene job;
app.py: the JSON/SSE API (Starlette); static/: the chat page and the scene page (/scene);
screenshot.py drives the page in headless Chromium; bench.py times a running server.
"""
