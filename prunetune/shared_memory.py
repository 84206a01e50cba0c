"""DeepSpeed's CPU all-reduce buffers, unlinked from /dev/shm once every rank mapped them.

On the CPU, DeepSpeed's communication backend gives each rank of a one-node group a
64 MiB shared-memory buffer, `deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>`, which
every other rank maps, and never unlinks it: each process group leaves its buffers in
/dev/shm, memory that stays taken until the machine restarts (a test suite of distributed
runs filled 17 GiB). Unlinking a name once every rank has mapped it keeps the memory
while the group lives and frees it when the last rank exits, even on a SIGKILL.
"""

from __future__ import annotations

import os
from pathlib import Path

SHM_DIR = Path("/dev/shm")
BUFFER_PREFIX = "deepspeed_allreduce_buffer"


def allreduce_buffer(rank: int) -> Path:
    """The /dev/shm file of `rank`'s buffer in the group that the environment names (its
    MASTER_ADDR and MASTER_PORT, as DeepSpeed read them)."""
    name = (f"{BUFFER_PREFIX}_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{rank}")
    return SHM_DIR / name


def allreduce_buffers() -> set[Path]:
    """Every DeepSpeed all-reduce buffer name now in /dev/shm, of any group."""
    return set(SHM_DIR.glob(f"{BUFFER_PREFIX}_*"))


def unlink_allreduce_buffer() -> None:
    """After a barrier (every rank of the group has mapped every buffer once DeepSpeed's
    backend is made), unlink this rank's buffer name; nothing to do without a group or
    without the buffer (GPUs, or ranks on several nodes)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    dist.barrier()
    allreduce_buffer(dist.get_rank()).unlink(missing_ok=True)
