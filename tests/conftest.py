import jax

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
