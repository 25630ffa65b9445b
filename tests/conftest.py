"""Test-wide setup: 8 fake CPU devices (set before jax is imported) and quiet TensorFlow."""
import os
import sys

os.environ["XLA_FLAGS"] = " ".join(
    [f for f in os.environ.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f]
    + ["--xla_force_host_platform_device_count=8"])
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)


import gin  # noqa: E402  (after XLA_FLAGS: gin does not import jax)
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def clean_gin():
    """Several configurables (ModelConfig, the data pipeline) read gin: no test sees another's bindings."""
    gin.clear_config()
    yield
    gin.clear_config()
