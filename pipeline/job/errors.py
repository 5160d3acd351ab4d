"""The job's own failures, importable without Ray so that a command line can catch them cheaply."""


class JobError(RuntimeError):
    """The job failed; the message is one line that says why."""


class PlanError(ValueError):
    """The checkpoint cannot be quantized as asked; the message says which tensor and why."""
