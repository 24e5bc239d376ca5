"""Work on a Ray cluster: a pool with `parallel.Pool`'s interface whose tasks run as Ray tasks.

The pack and decode pipelines hand their pool a lazy stream of `Task(fn, args)` items; `fn` is a
module-level function of pipeline.py and its arguments are small (plans, chunk records, paths). Every task
reads its own byte ranges from storage that all nodes see (source files, containers) and sends back only
its result (coded chunks and their records, or decoded bytes); decode tasks that write into an output file
do so themselves. Results are taken in task order with a bounded number in flight, so the output is
byte-identical to a local run and memory is bounded on the driver and in the object store.

Ray is optional (`pip install 'weightpack[ray]'`) and imported only here, only when asked for.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Optional

from .errors import ClusterError, UsageError
from .parallel import Task, ordered

RAY_MISSING = "--ray needs Ray, which is not installed: pip install 'weightpack[ray]'"
MAX_RETRIES = 4  # a task whose worker or node dies is run again (tasks are pure, or rewrite the same bytes)
INFLIGHT_PER_CPU = 4  # at most this many tasks per cluster CPU submitted and not yet taken (~4 MiB each)


def import_ray():
    try:
        import ray
    except ImportError:
        raise ClusterError(RAY_MISSING) from None
    return ray


def _run(fn, args):
    return fn(*args)


PROBE_TIMEOUT = 5.0


def _probe(address: Optional[str]) -> None:
    """Fail in seconds, with one line, when a HOST:PORT (or ray://HOST:PORT) address does not answer:
    ray.init itself retries for minutes."""
    if not address or address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[-1].rsplit("/", 1)[0]
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise UsageError(f"Ray address {address!r}: expected HOST:PORT, ray://HOST:PORT or auto")
    import socket

    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=PROBE_TIMEOUT).close()
    except OSError as e:
        raise ClusterError(f"cannot reach the Ray cluster at {address}: {e.strerror or e}") from None


class Session:
    """A connection to a Ray cluster for one API call: `address` as `ray.init` takes it ("auto",
    "host:6379", "ray://host:10001"; None: RAY_ADDRESS, else a new local instance). An existing connection
    is used as it is; one made here is closed at the end. `pool` is the pool factory for the pipelines."""

    def __init__(self, address: Optional[str] = None):
        self.address = address
        self.owned = False

    def __enter__(self) -> "Session":
        ray = import_ray()
        if not ray.is_initialized():
            _probe(self.address)
            try:
                ray.init(address=self.address, log_to_driver=False, include_dashboard=False,
                         logging_level="ERROR", configure_logging=False)
            except Exception as e:  # ConnectionError, RuntimeError, ValueError, TimeoutError, ...
                where = self.address or "the default address"
                msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise ClusterError(f"cannot reach the Ray cluster at {where}: {msg}") from None
            self.owned = True
        self.remote = ray.remote(max_retries=MAX_RETRIES, retry_exceptions=False, num_cpus=1)(_run)
        return self

    def __exit__(self, *exc) -> None:
        if self.owned:
            import_ray().shutdown()

    def cpus(self) -> int:
        return max(1, int(import_ray().cluster_resources().get("CPU", 1)))

    def pool(self, workers: Optional[int] = None, threads: bool = False) -> "RayPool":
        """The pool factory: `threads` is ignored (every task runs in a Ray worker process)."""
        return RayPool(self, workers)


class RayPool:
    """`parallel.Pool` on a Ray cluster: `workers` (default: the cluster's CPUs) sizes the window of tasks
    in flight; results come back in task order; non-Task items pass through in order."""

    def __init__(self, session: Session, workers: Optional[int] = None):
        self.session = session
        self.workers = session.cpus() if workers is None else max(1, int(workers))
        self.pending: set = set()  # refs submitted and not yet taken (cancelled should the pool fail)

    def __enter__(self) -> "RayPool":
        return self

    def __exit__(self, exc_type, *rest) -> None:
        if exc_type is not None:  # failed or interrupted: stop what is still queued or running
            ray = import_ray()
            for ref in self.pending:
                try:
                    ray.cancel(ref, force=True)
                except Exception:
                    pass
        self.pending.clear()

    def submit(self, fn, *args: Any) -> "_RayFuture":
        """Run one task on the cluster; its result is the returned future's `result()` (as parallel.Pool's)."""
        ref = self.session.remote.remote(fn, args)
        self.pending.add(ref)
        return _RayFuture(self, ref)

    def take(self, ref) -> Any:
        try:
            return _get(import_ray(), ref)
        finally:
            self.pending.discard(ref)

    def ordered_map(self, items: Iterable[Any], inflight: Optional[int] = None) -> Iterator[Any]:
        def submit(task: Task):
            ref = self.session.remote.remote(task.fn, task.args)
            self.pending.add(ref)
            return ref

        yield from ordered(items, submit, self.take, min(inflight or 3 * self.workers, INFLIGHT_PER_CPU * self.workers))


class _RayFuture:
    def __init__(self, pool: RayPool, ref):
        self.pool, self.ref = pool, ref

    def result(self) -> Any:
        if self.ref is not None:
            self.value, self.ref = self.pool.take(self.ref), None
        return self.value


def _get(ray, ref) -> Any:
    """A task's result; the task's own error as it was raised (one line), or a worker lost for good."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, BaseException):
            raise e.cause from None
        raise ClusterError(f"a Ray task failed: {str(e).splitlines()[0]}") from None
    except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError, ray.exceptions.ObjectLostError) as e:
        raise ClusterError(f"a Ray task failed after {MAX_RETRIES} retries: {type(e).__name__}") from None


class _Local:
    pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


EXECUTORS = ("local", "ray")


def executor(kind: Optional[str], address: Optional[str] = None):
    """A context manager whose `pool` is the pipelines' pool factory: None (parallel.Pool, on this machine)
    for "local", a Ray session's for "ray"."""
    if kind in (None, "local"):
        if address is not None:
            raise UsageError("ray_address needs executor='ray'")
        return _Local()
    if kind != "ray":
        raise UsageError(f"unknown executor {kind!r} (use one of {', '.join(EXECUTORS)})")
    return Session(address)
