"""Process-wide settings for the test suite, applied before any library reads them."""

import os
import tempfile

os.environ["SINQ_AUTO_PATCH"] = "0"
# Nothing here may reach the Hub: the Hub tests build their own cache under this HF_HOME.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="sinq-test-hf-")
os.environ.pop("HF_TOKEN", None)
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _torch_defaults_unchanged(request):
    """A test must leave torch's process-wide defaults as it found them."""
    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    yield
    changed = (torch.get_default_dtype(), torch.get_num_threads()) != (dtype, threads)
    torch.set_default_dtype(dtype)
    torch.set_num_threads(threads)
    assert not changed, f"{request.node.nodeid} changed torch defaults"


@pytest.fixture(scope="module")
def local_ray():
    """One real local Ray instance per test module that asks for it (never an existing cluster)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"SINQ_AUTO_PATCH": "0"}})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def s3(request):
    """A real S3 endpoint (moto's server on 127.0.0.1) holding the buckets the module names in ``S3_BUCKETS``."""
    from s3_server import s3_server

    with s3_server(*request.module.S3_BUCKETS) as fs:
        yield fs


@pytest.fixture(scope="module")
def ray_after_s3(s3, local_ray):
    """Ray starts once the endpoint and credentials are in the environment, which its workers inherit."""
    yield
