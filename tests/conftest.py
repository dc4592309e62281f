import jax

# Before anything initializes the backend: 8 simulated CPU devices for the ring tests.
jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_dtype_promotion", "strict")
