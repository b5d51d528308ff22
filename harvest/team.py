"""The processes of one harvest launch, as Accelerate sees them: which one this is, how many there
are, where each computes, and how they wait for and hear from the main one.

A plain `pipeline harvest` is a team of one, and every method below is then free.
"""

from dataclasses import dataclass

import torch

from .errors import HarvestError

_WORLD_SIZE_VARIABLES = ["WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"]
"""Where launchers (torchrun, which `accelerate launch` runs, and MPI) put the number of processes."""


@dataclass(frozen=True)
class Team:
    rank: int
    size: int

    @classmethod
    def join(cls, device: str) -> "Team":
        """This process's place in the launch (`accelerate launch`, `torchrun`, or none)."""
        from accelerate import PartialState
        from accelerate.utils import get_int_from_env

        if get_int_from_env(_WORLD_SIZE_VARIABLES, 1) == 1:
            return cls(0, 1)  # not launched as several: leave Accelerate's process-wide state alone

        # Without cpu=True Accelerate treats processes launched on a machine without an accelerator
        # as unrelated single processes, and each would harvest the whole store.
        on_cpu = device == "cpu" or (device == "auto" and not torch.accelerator.is_available())
        try:
            state = PartialState(cpu=on_cpu)
        except (RuntimeError, ValueError) as exc:
            raise HarvestError(f"cannot join the other harvest processes: {str(exc).splitlines()[0]}") from None
        return cls(state.process_index, state.num_processes)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def alone(self) -> bool:
        return self.size == 1

    def device(self, requested: str) -> str:
        """`auto` or a bare `cuda` means this process's own device (cuda:<local rank>)."""
        if self.alone or requested not in ("auto", "cuda"):
            return requested
        from accelerate import PartialState

        return str(PartialState().device)

    def wait(self) -> None:
        if not self.alone:
            from accelerate import PartialState

            PartialState().wait_for_everyone()

    def from_main(self, value):
        """The main process's `value`, in every process (picklable values only)."""
        if self.alone:
            return value
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([value], from_process=0)[0]

    def share(self, items: list) -> list:
        """This process's contiguous part of `items`: the parts are disjoint, in order, and differ in
        length by at most one."""
        n = len(items)
        return items[n * self.rank // self.size: n * (self.rank + 1) // self.size]

    def deal(self, items: list, group: int) -> list:
        """This process's groups of `group` consecutive items, dealt in turn: every process gets work
        from the start of `items` on (a streamed plan reaches each process's first group soon)."""
        groups = [items[i:i + group] for i in range(0, len(items), group)]
        return [item for g in groups[self.rank::self.size] for item in g]

    def leave(self) -> None:
        if not self.alone:
            from accelerate import PartialState

            PartialState().destroy_process_group()
