"""Run a function on several CPU processes joined in a gloo group on the loopback address, with a time limit.

Also holds the workarounds diffusers 0.42 needs to run context parallelism on a CPU-only machine. They live here,
in the tests, and change nothing in diffattn or diffusers beyond the process that runs the test.
"""

from __future__ import annotations

import functools
import os
import pickle
import socket
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def _entry(
    rank: int, fn: Callable, world_size: int, port: int, out_dir: str, args: tuple, collective_timeout: float
) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://{LOOPBACK}:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=collective_timeout),  # a rank stuck in a collective fails instead of hanging
    )
    try:
        result = fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()
    with open(Path(out_dir) / f"{rank}.pkl", "wb") as f:
        pickle.dump(result, f)


def run_on_ranks(fn: Callable[..., Any], world_size: int = 2, *, args: tuple = (), timeout: float = 90.0) -> list[Any]:
    """``[fn(rank, world_size, *args) for each rank]``, each rank in its own spawned process inside a gloo process
    group on 127.0.0.1. A rank that raises fails the call with its traceback; after ``timeout`` seconds the
    processes are killed and ``TimeoutError`` is raised. ``fn`` must be importable (a module-level function)."""
    with tempfile.TemporaryDirectory(prefix="diffattn-cp-") as out_dir:
        context = mp.start_processes(
            _entry,
            args=(fn, world_size, free_port(), out_dir, args, max(10.0, timeout / 2)),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout
        try:
            while not context.join(timeout=max(0.1, min(1.0, deadline - time.monotonic()))):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the {world_size} ranks did not finish within {timeout:.0f} s")
        finally:
            for process in context.processes:  # only the processes started above
                if process.is_alive():
                    process.kill()
                    process.join(5)
        results = []
        for rank in range(world_size):
            with open(Path(out_dir) / f"{rank}.pkl", "rb") as f:
                results.append(pickle.load(f))
        return results


def enable_context_parallel(model: torch.nn.Module, **config: Any) -> None:
    """``model.enable_parallelism(config=ContextParallelConfig(**config))`` on a CPU-only machine.

    Two diffusers 0.42 workarounds, for CPU-only hosts only (they do not change what is computed):

    1. ``enable_parallelism`` picks the rank's device as ``rank % torch.accelerator.device_count()``, which is
       ``rank % 0`` without an accelerator (``ZeroDivisionError``). While it runs, report one device; the device type
       comes from ``torch._C._get_accelerator()``, which is the CPU here, so every rank still works on the CPU.
    2. diffusers' context-parallel split hook calls ``logger.warning_once``, a method that only ``transformers`` adds
       to ``logging.Logger`` when it is imported (the tiny models do not import it). Give that one logger the method.
    """
    from diffusers import ContextParallelConfig
    from diffusers.hooks import context_parallel

    if not hasattr(context_parallel.logger, "warning_once"):
        context_parallel.logger.warning_once = functools.lru_cache(maxsize=None)(context_parallel.logger.warning)
    real_device_count = torch.accelerator.device_count
    patch = real_device_count() == 0
    if patch:
        torch.accelerator.device_count = lambda: 1
    try:
        model.enable_parallelism(config=ContextParallelConfig(**config))
    finally:
        if patch:
            torch.accelerator.device_count = real_device_count
