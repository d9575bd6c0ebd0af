# make demo: train + evaluate the toy EarthGPT on the generated mini MMRS-1M (CPU, minutes).
# make test: the test suite. Both create or reuse .venv and install from the pinned files.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_WORKDIR ?= workdir_demo
# CPU-only JAX; 8 virtual devices for mesh tests; NPROC=16 sizes XLA's CPU thread pool so
# multi-device collectives cannot deadlock on a 2-core machine.
ENV := JAX_PLATFORMS=cpu NPROC=16 TPU_SKIP_MDS_QUERY=1 HF_HUB_OFFLINE=1 PYTHONPATH=.

.PHONY: demo test install install-dev clean

$(VENV)/bin/activate:
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q pip==26.3

# --no-compile: pip would byte-compile all ~16,000 .py files of the environment (30 s on 2
# cores); Python compiles the modules a run imports on first use and caches them instead.
$(VENV)/.runtime-installed: requirements.txt | $(VENV)/bin/activate
	$(VENV)/bin/pip install -q --no-compile -r requirements.txt
	touch $@

$(VENV)/.dev-installed: requirements.txt requirements-dev.txt $(VENV)/.runtime-installed
	$(VENV)/bin/pip install -q --no-compile -r requirements-dev.txt
	touch $@

# Apache Beam and the older protobuf/pillow/pyarrow it needs, apart from .venv (see the file).
$(VENV)/.beam-installed: requirements-beam.txt $(VENV)/.runtime-installed
	rm -rf $(VENV)/beam-overlay
	$(VENV)/bin/pip install -q --no-compile --no-deps --target $(VENV)/beam-overlay -r requirements-beam.txt
	touch $@

install: $(VENV)/.runtime-installed
install-dev: $(VENV)/.dev-installed $(VENV)/.beam-installed

demo: install
	$(ENV) $(PY) main.py --config=configs/mmrs.py:demo --workdir=$(DEMO_WORKDIR)

test: install-dev
	$(ENV) XLA_FLAGS=--xla_force_host_platform_device_count=8 $(PY) -m pytest -q -n 2 --dist loadfile --durations=10 tests

clean:
	rm -rf $(VENV) $(DEMO_WORKDIR)
