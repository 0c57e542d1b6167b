"""Where the time goes: profiles of a benchmark's threadsync part.

threadsync works on two kinds of threads: the event loop (IMAP, SMTP, parsing)
and worker threads (every database transaction, via ``asyncio.to_thread``). A
profiler attached to one thread misses the other, so :func:`profiled` records
both:

* the event loop with pyinstrument in async mode (wall time, awaits attributed
  to the line that awaited), or cProfile when pyinstrument is not installed;
* the worker threads with one cProfile per thread, switched on only while a
  function submitted to the loop's default executor runs, merged at the end.

Reports are plain text files in the output folder: ``NAME.loop.txt`` and
``NAME.workers.txt``.
"""

from __future__ import annotations

import asyncio
import contextlib
import cProfile
import io
import pstats
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any


class _ProfilingExecutor(ThreadPoolExecutor):
    def __init__(self) -> None:
        super().__init__(thread_name_prefix="bench-profiled")
        self._local = threading.local()
        self.profiles: list[cProfile.Profile] = []
        self._lock = threading.Lock()

    def _profile(self) -> cProfile.Profile:
        prof = getattr(self._local, "profile", None)
        if prof is None:
            prof = self._local.profile = cProfile.Profile()
            with self._lock:
                self.profiles.append(prof)
        return prof

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        def run() -> Any:
            prof = self._profile()
            prof.enable()
            try:
                return fn(*args, **kwargs)
            finally:
                prof.disable()

        return super().submit(run)


def _stats_text(stats: pstats.Stats, title: str, lines: int = 45) -> str:
    out = io.StringIO()
    stats.stream = out  # type: ignore[attr-defined]
    out.write(f"==== {title}: by cumulative time ====\n")
    stats.sort_stats("cumulative").print_stats(lines)
    out.write(f"\n==== {title}: by own time ====\n")
    stats.sort_stats("tottime").print_stats(lines)
    return out.getvalue()


@contextlib.contextmanager
def profiled(name: str, outdir: Path | None) -> Iterator[None]:
    """Profile the block (which must run on the event loop) into ``outdir``;
    does nothing when ``outdir`` is None."""
    if outdir is None:
        yield
        return
    outdir.mkdir(parents=True, exist_ok=True)
    loop = asyncio.get_running_loop()
    previous = getattr(loop, "_default_executor", None)
    executor = _ProfilingExecutor()
    loop.set_default_executor(executor)
    profiler: Any = None
    main_profile: cProfile.Profile | None = None
    try:
        from pyinstrument import Profiler
    except ImportError:
        main_profile = cProfile.Profile()
        main_profile.enable()
    else:
        profiler = Profiler(interval=0.0005, async_mode="enabled")
        profiler.start()
    try:
        yield
    finally:
        if profiler is not None:
            profiler.stop()
            loop_text = profiler.output_text(unicode=True, color=False, show_all=False)
        else:
            assert main_profile is not None
            main_profile.disable()
            loop_text = _stats_text(pstats.Stats(main_profile), "event loop")
        (outdir / f"{name}.loop.txt").write_text(loop_text)
        executor.shutdown(wait=True)
        if previous is not None:
            loop.set_default_executor(previous)
        else:
            loop.set_default_executor(ThreadPoolExecutor())
        if executor.profiles:
            stats = pstats.Stats(executor.profiles[0])
            for prof in executor.profiles[1:]:
                stats.add(prof)
            (outdir / f"{name}.workers.txt").write_text(_stats_text(stats, "worker threads"))
