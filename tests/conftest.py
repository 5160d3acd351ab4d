"""Process-wide settings for the test suite, applied before any library reads them."""

import atexit
import os
import secrets
import shutil
import tempfile

os.environ["SINQ_AUTO_PATCH"] = "0"
# Nothing here may reach the Hub: the Hub tests build their own cache under this HF_HOME.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="sinq-test-hf-")
os.environ.pop("HF_TOKEN", None)
# Ray's token authentication is on, as a user meets it: `ray.init()` turns it on for a new local
# instance and a head started with a token requires it. Every Ray this suite starts (local_ray,
# ray.cluster_utils.Cluster, `ray start` heads and drivers in subprocesses, which inherit this
# environment) and every client takes this session's token from a mode-600 file, never from
# ~/.ray/auth_token or a developer's own RAY_AUTH_TOKEN (which would take precedence over the file).
_ray_auth_dir = tempfile.mkdtemp(prefix="sinq-test-ray-auth-")
atexit.register(shutil.rmtree, _ray_auth_dir, True)  # registered before Ray's own exit hooks, so it runs after them
_ray_auth_token_file = os.path.join(_ray_auth_dir, "auth_token")
with open(os.open(_ray_auth_token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as _f:
    _f.write(secrets.token_hex(32))
os.environ.pop("RAY_AUTH_TOKEN", None)
os.environ["RAY_AUTH_MODE"] = "token"
os.environ["RAY_AUTH_TOKEN_PATH"] = _ray_auth_token_file


import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    # Triton decorates its own library functions when it is first imported, by whichever module
    # imports it first (transformers can); test_kernels runs the kernels under the interpreter,
    # which those functions must then be in too. test_kernels unsets this after importing the kernels.
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(autouse=True)
def _torch_defaults_unchanged(request):
    """A test must leave torch's process-wide defaults as it found them."""
    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    yield
    changed = (torch.get_default_dtype(), torch.get_num_threads()) != (dtype, threads)
    torch.set_default_dtype(dtype)
    torch.set_num_threads(threads)
    assert not changed, f"{request.node.nodeid} changed torch defaults"


@pytest.fixture(scope="session")
def ray_auth_token() -> str:
    """The token every Ray of this session requires (to check that it never leaks)."""
    with open(os.environ["RAY_AUTH_TOKEN_PATH"]) as f:
        return f.read().strip()


@pytest.fixture
def no_ray_token(tmp_path) -> dict[str, str]:
    """The environment of a shell that has no Ray token: no RAY_AUTH_* variables, an empty HOME."""
    home = tmp_path / "home-without-a-ray-token"
    home.mkdir()
    return {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH_")}, "HOME": str(home)}


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
