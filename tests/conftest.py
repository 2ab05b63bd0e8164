"""Test-wide JAX setup: 8 fake CPU devices for sharding tests, strict rank promotion, and the
project's persistent compilation cache (train/compile_cache.py: $QTARGET_JAX_COMPILE_CACHE,
default ~/.cache/qtarget_jax/jax; `off` disables it), so a second `make test` reads the many
small programs it compiled the first time instead of compiling them again.

The XLA flag must be set before jax initialises its backend, so it lives here, once.

Under pytest-xdist (`make test` runs 2 workers on 2 cores), the reference libraries' OpenMP
pools (PyTorch, numpy's BLAS) get one thread per worker: two workers each spinning two OpenMP
threads on two cores only wait on each other. And the `slow` tests are handed out first, so the
minute-long ones do not start last and leave one worker alone at the end (the order of the
others is unchanged).
"""
import os

if os.environ.get("PYTEST_XDIST_WORKER"):
    for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, "1")

os.environ.setdefault("XLA_FLAGS", "")
if "--xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
# The suite compiles a few hundred small programs once each: at XLA's backend optimisation
# level 0 (LLVM's passes off; the HLO, its fusions and the dot libraries are the same) the
# suite ran 8 min 9 s instead of 9 min 39 s here. QTARGET_JAX_TEST_XLA_OPT=full compiles as
# users do.
if (os.environ.get("QTARGET_JAX_TEST_XLA_OPT", "0") != "full"
        and "--xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]):
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The tests' programs are small: keep every one that takes a tenth of a second to compile (also
# in the train.py subprocesses some tests start, which inherit this).
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

from qtarget_jax.train.compile_cache import enable_persistent_cache  # noqa: E402

enable_persistent_cache()


def pytest_collection_modifyitems(config, items):
    """Runs the tests marked `slow` first; a stable sort, so each group keeps its order."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
