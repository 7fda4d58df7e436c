"""Users one after another in this process, or as Ray tasks (one user per task) when asked for
workers or given a cluster address. Rows come back in job order either way."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from bench.protocol import UserJob, run_user

REPO = Path(__file__).resolve().parent.parent


def run_users(jobs: list[UserJob], workers: int = 1, ray_address: str | None = None, threads: int = 1,
              done: Callable[[int, dict], None] | None = None) -> list[dict]:
    done = done or (lambda index, row: None)
    if workers <= 1 and not ray_address:
        rows = []
        for index, job in enumerate(jobs):
            rows.append(run_user(job))
            done(index, rows[-1])
        return rows
    return _ray(jobs, workers, ray_address, threads, done)


def _ray(jobs, workers, ray_address, threads, done) -> list[dict]:
    import ray

    # Workers pin TensorFlow's threads before importing it: the figures are bit-identical only at a
    # fixed thread count, so serial runs compare at the same EE_THREADS.
    env = {"EE_THREADS": str(threads), "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "TF_CPP_MIN_LOG_LEVEL": "3"}
    options = {"runtime_env": {"env_vars": env}, "log_to_driver": False, "include_dashboard": False, "logging_level": "ERROR"}
    if ray_address:
        ray.init(address=ray_address, **options)
    else:
        ray.init(num_cpus=workers, **options)
    try:
        # One user per worker process (max_calls=1): a process that ran a 240 px user held 7-9 GB after it,
        # and the next user's `ee personalise` child came on top (a worker was killed for memory).
        task = ray.remote(num_cpus=1, max_retries=0, max_calls=1)(run_user)
        pending = {_submit(task, job, workers, threads, env): index for index, job in enumerate(jobs)}
        rows: list[dict | None] = [None] * len(jobs)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            index = pending.pop(ready[0])
            rows[index] = ray.get(ready[0])
            done(index, rows[index])
        return rows
    finally:
        ray.shutdown()


def _submit(task, job: UserJob, workers: int, threads: int, env: dict):
    """A user as a Ray task on the cores its generic model takes (at most the workers there are), with
    as many TensorFlow threads."""
    cores = min(job.cores, workers)
    if cores == 1:
        return task.remote(job)
    return task.options(num_cpus=cores, runtime_env={"env_vars": env | {"EE_THREADS": str(cores * threads)}}).remote(job)
