"""``stitchc tune --cluster ADDRESS``: the measurement jobs of ``runtime.tune`` on a Ray cluster.

Each job (a batch of one workload's candidates) runs as one Ray task calling
``runtime.tune.run_job``; the records come back to the driver, which merges them into its one
store as each job finishes (so an interrupted driver keeps every job that came back). At most
``per_node`` jobs run per alive node at a time (default one: two timing jobs on one machine
would disturb each other's timings). A job whose worker is lost (the process died, the node
left) is queued again, up to ``attempts`` times, on whatever node is alive; a job that fails by
itself (a compile error) is reported and dropped, not retried.

Records carry the fingerprint and host name of the worker's machine: a cluster of unlike
machines gives records of several fingerprints, and a model is trained per fingerprint.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator


def _job(job: dict) -> dict:
    from runtime.tune import run_job

    return run_job(job)


def _lost(exc: BaseException) -> bool:
    """Whether ``exc`` says the worker (not the job) failed."""
    import ray.exceptions as rx

    kinds = tuple(getattr(rx, n) for n in ("WorkerCrashedError", "NodeDiedError",
                                           "ObjectLostError", "OwnerDiedError",
                                           "RayActorError", "LocalRayletDiedError",
                                           "TaskUnschedulableError") if hasattr(rx, n))
    return isinstance(exc, kinds)


def connect(address: str) -> bool:
    """Connect to ``address`` ('local' starts a Ray instance here); returns whether this call
    started (and so must shut down) the connection."""
    import ray

    if ray.is_initialized():
        return False
    env = {k: v for k, v in os.environ.items() if k.startswith("STITCH_") or k == "PYTHONPATH"}
    if address == "local":
        ray.init(include_dashboard=False, runtime_env={"env_vars": env}, log_to_driver=False)
    else:
        ray.init(address=address, log_to_driver=False)
    return True


def run_on_ray(address: str, jobs: list[dict], per_node: int = 1, attempts: int = 3,
               log=print) -> Iterator[tuple[dict, dict]]:
    """Run ``jobs``; yields (job, result) as they finish (any order)."""
    import ray

    started = connect(address)
    try:
        remote = ray.remote(num_cpus=1, max_retries=0)(_job)
        pending = deque((job, 1) for job in jobs)
        running: dict = {}
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        log(f"  ray: {len(nodes)} node(s), {int(ray.cluster_resources().get('CPU', 0))} cpus; "
            f"{len(jobs)} jobs, {per_node} at a time per node")
        while pending or running:
            slots = max(1, per_node * len([n for n in ray.nodes() if n.get("Alive")]))
            while pending and len(running) < slots:
                job, attempt = pending.popleft()
                running[remote.options(scheduling_strategy="SPREAD").remote(job)] = (job, attempt)
            (ref,), _ = ray.wait(list(running), num_returns=1)
            job, attempt = running.pop(ref)
            try:
                result = ray.get(ref)
            except Exception as e:  # noqa: BLE001 - sorted into lost worker / failed job below
                if _lost(e) and attempt < attempts:
                    log(f"  ray: a worker was lost running a {job['workload']} job "
                        f"({type(e).__name__}); retrying it elsewhere (attempt {attempt + 1})")
                    pending.append((job, attempt + 1))
                    continue
                log(f"  ray: a {job['workload']} job failed after {attempt} attempt(s): "
                    f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                continue
            result["attempts"] = attempt
            yield job, result
    finally:
        if started:
            ray.shutdown()
