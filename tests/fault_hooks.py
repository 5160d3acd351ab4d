"""Set-up hooks that Ray runs in each worker process of a test job."""

import resource

FILE_SIZE_LIMIT = 6_000_000


def limit_file_size() -> None:
    """Writes past this size fail with EFBIG, as they would with ENOSPC on a full disk."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT, FILE_SIZE_LIMIT))
