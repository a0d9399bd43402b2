"""CPU workers for the routed experts: a process-wide pool of single-threaded threads that take chunks of work
as they finish, and the hand-off from the calling thread's OpenMP threads to them.

Experts run in parallel on the workers instead of each small op forking and joining OpenMP threads; a worker that
the machine slows down simply takes fewer chunks.
"""

from __future__ import annotations

import ctypes
import glob
import itertools
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch

_POOL: ThreadPoolExecutor | None = None


def run_chunks(fn, chunks: list, outs: list[torch.Tensor], workers: int, *args) -> list:
    """[fn(chunk, out, *args) for chunk in chunks], on `workers` single-threaded CPU workers that each take the
    next chunk when done with one and accumulate into their own buffer outs[w] (allocated by the caller); workers=0
    runs every chunk in the calling thread with outs[0]. Even one worker beats the calling thread when that has
    several intra-op threads: small ops such as a 1-row index_add_ would pay a fork/join each (25 ms apiece on a
    busy machine)."""
    if workers == 0:
        return [fn(chunk, outs[0], *args) for chunk in chunks]
    release_openmp_team()
    inference = torch.is_inference_mode_enabled()
    results: list = [None] * len(chunks)
    next_chunk = itertools.count()  # next() on a count is atomic under the GIL

    def run(out):
        with torch.inference_mode(inference), torch.no_grad():
            while (i := next(next_chunk)) < len(chunks):
                results[i] = fn(chunks[i], out, *args)
    for f in [worker_pool(torch.get_num_threads()).submit(run, out) for out in outs[:workers]]:
        f.result()
    return results


def _find_openmp_pause() -> Callable[[int], int] | None:
    """`omp_pause_resource_all` of the OpenMP runtime that torch's CPU ops run on (None where there is none)."""
    try:
        lib_dir = os.path.join(os.path.dirname(torch.__file__), "lib")
        bundled = [p for pattern in ("libgomp*.so*", "libiomp5*.so*", "libomp*.so*", "libomp*.dylib")
                   for p in glob.glob(os.path.join(lib_dir, pattern))]
        pause = (ctypes.CDLL(bundled[0]) if bundled else ctypes.CDLL(None)).omp_pause_resource_all
    except (OSError, AttributeError, TypeError):
        return None
    pause.argtypes, pause.restype = [ctypes.c_int], ctypes.c_int
    return pause


_OPENMP_PAUSE = _find_openmp_pause()
_OMP_PAUSE_SOFT = 1


def release_openmp_team() -> None:
    """Let the calling thread's OpenMP threads go before the CPU workers start. After a parallel op an OpenMP
    thread spins for the next one (GNU OpenMP: ~300,000 spins, several ms); on a machine with as many cores as
    workers it would take a core from a worker for all that time (measured: 2 workers running 7 ms of GEMMs took
    13-15 ms right after a parallel op, 7 ms after this call). The threads are made again by the next parallel
    op (~0.1 ms each way)."""
    if _OPENMP_PAUSE is not None and torch.get_num_threads() > 1:
        _OPENMP_PAUSE(_OMP_PAUSE_SOFT)


def worker_pool(size: int) -> ThreadPoolExecutor:
    """A process-wide pool of `size` threads, each with one intra-op thread (so workers never oversubscribe)."""
    global _POOL
    if _POOL is None or _POOL._max_workers < size:  # type: ignore[attr-defined]
        ready = threading.Barrier(size + 1)
        _POOL = ThreadPoolExecutor(size, thread_name_prefix="experts")
        for _ in range(size):  # start every worker now and make it single-threaded
            _POOL.submit(_single_threaded, ready)
        ready.wait()
        torch.set_num_threads(size)  # set_num_threads in a worker also changed the default of new threads
    return _POOL


def _single_threaded(ready: threading.Barrier) -> None:
    """Give this worker thread one intra-op thread for good. A thread takes the process-wide thread count on its
    first parallel op (`get_num_threads` does that lazy set-up), so that comes first: otherwise the count set here
    would be replaced by the calling thread's later one, and each worker would fork an OpenMP team of its own."""
    torch.get_num_threads()
    torch.set_num_threads(1)
    ready.wait()
