"""The Dask client a pipeline job runs on: a LocalCluster on loopback, or an existing cluster.

Scaling out is one flag: `--scheduler tcp://host:8786` connects to a running cluster instead of
starting a local one; nothing else in the job changes. Workers must see the raw and output
directories at the same paths (a shared filesystem), as for any Dask job that writes files.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterator

from vitrine.errors import UserError


@contextmanager
def dask_client(scheduler: str | None, workers: int, threads_per_worker: int = 1) -> Iterator["object"]:
    from distributed import Client, LocalCluster

    if scheduler:
        try:
            client = Client(scheduler, timeout="20s")
        except (OSError, TimeoutError) as exc:
            raise UserError(f"cannot reach the Dask scheduler at {scheduler} ({exc}); is it running?") from None
        try:
            yield client
        finally:
            client.close()
        return
    if workers < 1:
        raise UserError(f"--workers must be >= 1 (got {workers})")
    # Processes, not threads: the pandas/numpy work holds the GIL for long stretches. Loopback only,
    # no dashboard: nothing listens beyond this machine.
    cluster = LocalCluster(
        n_workers=workers,
        threads_per_worker=threads_per_worker,
        processes=True,
        host="127.0.0.1",
        dashboard_address=None,
        silence_logs=logging.ERROR,
    )
    client = Client(cluster)
    try:
        yield client
    finally:
        client.close()
        cluster.close()
