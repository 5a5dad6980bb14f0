import os
import tempfile

import pytest


@pytest.fixture(scope="module")
def ray_local():
    """One embedded Ray per test module (auth off, its own temp dir, more logical CPUs than cores:
    the actors are mostly idle waiting on each other)."""
    import ray

    os.environ["RAY_AUTH_MODE"] = "disabled"
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False,
             _temp_dir=tempfile.mkdtemp(prefix="rmt", dir="/tmp"))
    yield ray
    ray.shutdown()
