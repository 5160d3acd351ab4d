"""Process-wide settings for the test suite, applied before any library reads them."""

import os
import tempfile

os.environ["SINQ_AUTO_PATCH"] = "0"
# Nothing here may reach the Hub: the Hub tests build their own cache under this HF_HOME.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="sinq-test-hf-")
os.environ.pop("HF_TOKEN", None)
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
