import os

os.environ.setdefault("SINQ_AUTO_PATCH", "0")
