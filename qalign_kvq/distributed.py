"""The few collectives the recipe and the scorer run themselves, outside the Trainer: object
gather/broadcast (on a gloo side group with its own timeout when the work between them may be long,
so ``ddp_timeout`` stays a hang detector), and the shutdown that ends the last collective before
long single-process work (a Hub push, a merge). Without a process group every function is the
single-process identity."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import timedelta

import torch.distributed as dist


def rank_and_size() -> tuple[int, int]:
    """``(rank, world size)`` of the default process group; ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@contextlib.contextmanager
def side_group(timeout: timedelta) -> Iterator[object | None]:
    """A gloo group of every process whose collectives wait up to ``timeout`` (not the default
    group's), destroyed on exit; None without a process group. Every process must enter it."""
    if rank_and_size()[1] == 1:
        yield None
        return
    group = dist.new_group(backend="gloo", timeout=timeout)
    try:
        yield group
    finally:
        dist.destroy_process_group(group)


def all_gather(obj, group=None) -> list:
    """Every process's ``obj`` (picklable), in rank order; ``[obj]`` without a process group."""
    if rank_and_size()[1] == 1:
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=group)
    return out


def broadcast(obj, group=None):
    """Process 0's ``obj`` on every process (the others pass anything)."""
    if rank_and_size()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def end_process_group() -> None:
    """The last collective: wait for every process, then shut the process group down, so that what
    one process still does afterwards (upload, merge) runs under no timeout and the others can exit.
    Also a clean exit: gloo threads left running at interpreter exit can abort a finished rank."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
