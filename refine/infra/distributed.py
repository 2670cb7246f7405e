"""The processes of a run under ``accelerate launch`` or ``torchrun``: who is main, and moving rows between them.

One process (``world == 1``) is the plain case, and every method is then a no-op that never touches
``torch.distributed``. With several, the process group is the one accelerate sets up from the launcher's
environment (gloo on CPU, NCCL on GPUs), with a long timeout: the other ranks wait in a collective
while the main rank talks to the critic, which can take hours on a large set.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

# The other ranks wait in a collective while the main rank runs the critique and step stages.
WAIT_TIMEOUT = timedelta(hours=48)


def launched_world() -> int:
    """How many processes the launcher started (``WORLD_SIZE``; 1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass
class Ranks:
    rank: int = 0
    world: int = 1
    device: Any = None  # this rank's device (``cuda:<local rank>`` on GPUs), None: let the config choose

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> Ranks:
        """This process's place in the launch. Initialises the process group when there are several."""
        if launched_world() <= 1:
            return cls()
        import torch
        from accelerate import PartialState

        # cpu=True on a machine without GPUs: accelerate otherwise looks for MPI to run CPU processes
        state = PartialState(cpu=not torch.cuda.is_available(), timeout=WAIT_TIMEOUT)
        return cls(state.process_index, state.num_processes, state.device)

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def broadcast(self, obj: Any) -> Any:
        """The main rank's ``obj`` on every rank (picklable objects)."""
        if self.world == 1:
            return obj
        import torch.distributed as dist

        box = [obj if self.main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, items: Sequence[Any]) -> list[list[Any]]:
        """Every rank's ``items``, by rank, on every rank."""
        if self.world == 1:
            return [list(items)]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, list(items))
        return out

    def shard(self, chunk: Sequence[Any], size: int) -> Sequence[Any]:
        """This rank's part of ``chunk`` (``world`` parts of ``size``): rank ``r`` takes items
        ``[r * size, (r + 1) * size)``, so each part is exactly a batch a single process would make."""
        return chunk[self.rank * size : (self.rank + 1) * size]
