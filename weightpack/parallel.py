"""Work spread over processes (for tasks that hold the GIL: the lossy stages in torch, constriction), or
over threads for tasks that release it (the compiled kernels, zlib, hashlib, zstd).

`ordered_map` runs tasks from a lazy iterator with a bounded number in flight and yields results in
task order, so output is identical whatever the number of workers. Items that are not `Task`s pass
through in order: the producer can interleave bookkeeping with work.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator


@dataclass
class Task:
    fn: Callable
    args: tuple


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (also on kill -9 of the parent)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: workers end when their task pipe closes
        pass


def _worker_init(parent: int) -> None:
    # Ctrl-C reaches the whole process group: the main process handles it (cleans up, one line),
    # workers are killed by it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    if os.getppid() != parent:  # the parent died before the death signal was armed
        os._exit(1)


class Pool:
    """A process pool, or with `threads` a thread pool (for tasks that spend their time outside the GIL),
    or inline execution for one worker; used as a context manager."""

    def __init__(self, workers: int | None, threads: bool = False):
        self.workers = default_workers() if workers is None else max(1, int(workers))
        self.ex = None
        self.others = set()  # pids of processes this one had started before: not this pool's workers
        if self.workers > 1 and threads:
            # for work that releases the GIL (the compiled decode kernels, zlib, hashlib, zstd, numpy, torch)
            self.ex = ThreadPoolExecutor(self.workers)
        elif self.workers > 1:
            # fork: workers start in milliseconds and inherit the imported modules. Lossy stages run torch
            # in them, each in one torch thread (stages/lossy.py), so that they do not fight over the cores.
            self.others = {p.pid for p in multiprocessing.active_children()}
            self.ex = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("fork"),
                                          initializer=_worker_init, initargs=(os.getpid(),))

    def __enter__(self) -> "Pool":
        return self

    def __exit__(self, exc_type, *rest) -> None:
        if self.ex is None:
            return
        if exc_type is not None and isinstance(self.ex, ProcessPoolExecutor):
            # Interrupted or failed: kill the workers now rather than let them finish queued work (and
            # never leave the interpreter waiting on them at exit), then reap them. The workers are the
            # processes started since the pool was made (the pipelines run one process pool at a time).
            procs = [p for p in multiprocessing.active_children() if p.pid not in self.others]
            for p in procs:
                try:
                    p.kill()
                except (OSError, ValueError):
                    pass
            self.ex.shutdown(wait=False, cancel_futures=True)
            for p in procs:
                try:
                    p.join(2)
                except (OSError, AssertionError, ValueError):
                    pass
            return
        self.ex.shutdown(wait=exc_type is None, cancel_futures=True)

    def submit(self, fn: Callable, *args: Any) -> Future:
        """Run one task on the pool (at once, here, for one worker); its result is the future's."""
        if self.ex is None:
            f: Future = Future()
            f.set_result(fn(*args))
            return f
        return self.ex.submit(fn, *args)

    def ordered_map(self, items: Iterable[Any], inflight: int | None = None) -> Iterator[Any]:
        if self.ex is None:
            for item in items:
                yield item.fn(*item.args) if isinstance(item, Task) else item
            return
        yield from ordered(items, lambda t: self.ex.submit(t.fn, *t.args), lambda f: f.result(),
                           inflight or 3 * self.workers)


def ordered(items: Iterable[Any], submit: Callable[[Task], Any], result: Callable[[Any], Any],
            limit: int) -> Iterator[Any]:
    """The results of the Tasks among `items` (run by `submit`, collected by `result`), and the other items
    as they are, in the items' order, with at most `limit` tasks submitted and not yet collected."""
    it = iter(items)
    queue: deque = deque()
    running, exhausted = 0, False
    while True:
        while not exhausted and running < limit:
            try:
                item = next(it)
            except StopIteration:
                exhausted = True
                break
            if isinstance(item, Task):
                queue.append((submit(item), True))
                running += 1
            else:
                queue.append((item, False))
        if not queue:
            return
        handle, is_task = queue.popleft()
        if not is_task:
            yield handle
            continue
        running -= 1
        value = result(handle)
        del handle  # (a Ray result is freed once no reference to it is left)
        yield value

