"""The quantize job, stage by stage: options, plan, the unit a worker processes, the reduce stage,
the Ray actors that run them, and the driver that ties them together (``run.run_job``)."""
