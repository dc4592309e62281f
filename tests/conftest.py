import os

# The suite compiles thousands of small programs and runs each once: XLA:CPU's LLVM optimizations cost more than
# they save there (tests/test_strategies.py -k "ulysses_f32 and 8-zigzag": 44.5 s with them, 25.6 s without; a
# decoding test 60 s -> 51 s). They change how the machine code is optimized, not what it computes. Subprocesses
# (the CLI, the docs) inherit them.
os.environ["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS"), "--xla_backend_optimization_level=0",
                                                 "--xla_llvm_disable_expensive_passes=true"]))

import jax  # noqa: E402

# Before anything initializes the backend: 8 simulated CPU devices for the ring tests.
jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_dtype_promotion", "strict")


import jaxtyping  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _fresh_compilation_caches():
    """Drop each module's compiled programs when it ends: the suite compiles thousands of them in one process, and
    a full CI run kept them all until XLA crashed compiling in the last modules (a segfault in test_sharding, whose
    test passes alone)."""
    yield
    jax.clear_caches()


@pytest.fixture
def no_hook():
    """The library's own checks, as seen where the jaxtyping hook is off (e.g. the GPU machines)."""
    jaxtyping.config.update("jaxtyping_disable", True)
    yield
    jaxtyping.config.update("jaxtyping_disable", False)
