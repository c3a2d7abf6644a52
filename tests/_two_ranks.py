"""Two CPU processes joined by a gloo process group, kept alive across tests.

Starting a process that imports torch and diffusers takes seconds, so the tests share one pair of workers and send
them scenarios by name: ``pool.run(scenario, *args)`` calls ``scenario(rank, *args)`` on both ranks and returns the
two return values, or fails the test with the worker's traceback. A scenario that hangs past its timeout kills the
pair; the next ``run`` starts a fresh one.
"""

from __future__ import annotations

import importlib
import os
import queue
import socket
import time
import traceback
from datetime import timedelta

import pytest
import torch.multiprocessing as mp

WORLD_SIZE = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(rank: int, port: int, tasks, results) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # A short collective timeout turns a scenario that deadlocks into an error instead of a stuck worker.
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE, timeout=timedelta(seconds=60))
    torch.set_num_threads(1)  # two processes share two cores
    while (task := tasks.get()) is not None:
        module, name, args = task
        try:
            value = getattr(importlib.import_module(module), name)(rank, *args)
            results.put((rank, True, value))
        except BaseException:  # noqa: BLE001 - the parent shows the traceback
            results.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()


class TwoRanks:
    def __init__(self) -> None:
        self._processes = []

    def _start(self) -> None:
        context = mp.get_context("spawn")
        self._tasks = [context.Queue() for _ in range(WORLD_SIZE)]
        self._results = context.Queue()
        port = _free_port()
        self._processes = [
            context.Process(target=_serve, args=(rank, port, self._tasks[rank], self._results), daemon=True)
            for rank in range(WORLD_SIZE)
        ]
        for process in self._processes:
            process.start()

    def run(self, scenario, *args, timeout: float = 120) -> list:
        if not self._processes or not all(process.is_alive() for process in self._processes):
            self.close()
            self._start()
        for tasks in self._tasks:
            tasks.put((scenario.__module__, scenario.__name__, args))
        values = [None] * WORLD_SIZE
        failures = []
        deadline = time.monotonic() + timeout
        for _ in range(WORLD_SIZE):
            rank, ok, value = self._next_result(scenario.__name__, deadline)
            if ok:
                values[rank] = value
            else:
                failures.append(f"rank {rank}:\n{value}")
        if failures:
            pytest.fail(f"{scenario.__name__} failed\n" + "\n".join(failures), pytrace=False)
        return values

    def _next_result(self, name: str, deadline: float):
        while True:
            try:
                return self._results.get(timeout=1)
            except queue.Empty:
                pass
            dead = [(rank, p.exitcode) for rank, p in enumerate(self._processes) if not p.is_alive()]
            if dead or time.monotonic() > deadline:
                self.close()
                why = f"worker exited: {dead}" if dead else "timed out (hang?)"
                pytest.fail(f"{name} did not finish on both ranks: {why}", pytrace=False)

    def close(self) -> None:
        for process, tasks in zip(self._processes, getattr(self, "_tasks", [])):
            if process.is_alive():
                tasks.put(None)
                process.join(timeout=10)
            if process.is_alive():
                process.kill()
                process.join()
        self._processes = []
