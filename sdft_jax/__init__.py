"""sdft-jax: Self-Distillation Fine-Tuning (SDFT) for JAX/Flax."""

import os

# This package never downloads from a model hub: without this, a missing local file costs tens of seconds of
# retries in `transformers` before the error.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

__version__ = "0.1.0"
