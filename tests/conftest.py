"""Every test process sees 8 virtual CPU devices, set before JAX starts, so multi-device code runs on CPU.

The test processes (and the scripts they start) share JAX's persistent compilation cache, so a program that
several tests compile alike (the lesson's CNN, mostly) is compiled once per run; results are the same either way.
"""

import os
import tempfile

os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"]
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "flaxlesson-tests-jax-cache"))
