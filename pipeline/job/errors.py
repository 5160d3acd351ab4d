"""The job's own failure, importable without Ray so that a command line can catch it cheaply."""


class JobError(RuntimeError):
    """The job failed; the message is one line that says why."""
