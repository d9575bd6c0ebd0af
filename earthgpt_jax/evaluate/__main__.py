"""`python -m earthgpt_jax.evaluate --task=... --predictions=...`: the same as `.score`."""

import sys

from earthgpt_jax.evaluate.score import main

sys.exit(main())
