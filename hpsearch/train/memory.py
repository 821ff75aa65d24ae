"""Will a configuration fit? A rough upper bound of what training it needs, against what the
device (or this process's limits) can still give, so a space that allows 32 layers of 16,384
units fails that trial in one line instead of ending the run (or the machine) out of memory.
"""

from __future__ import annotations

import os
import resource
from pathlib import Path

import torch

from ..specs import ModelSpec

# Weights, gradients, two Adam moments and the update's temporaries, float32 (measured: 4 layers of
# 4,096 units, 36.8M parameters, peaked 988 MiB above the data; 7 copies = 1,030 MiB).
_STATE_COPIES = 7
# Per activation unit and sample: its value, the activation's output, a dropout mask and the
# gradient, float32, with headroom for padded stacks and temporaries.
_ACTIVATION_BYTES = 4 * 6
# Leave this share of what is free to everything else (the data, other members, the allocator).
_USABLE = 0.8


def training_bytes(spec: ModelSpec, batch_size: int) -> int:
    """A rough upper bound of one member's training memory beyond the dataset."""
    return 4 * _STATE_COPIES * spec.param_count() + _ACTIVATION_BYTES * batch_size * spec.activation_units()


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_available() -> int | None:
    """A container's or job's memory limit (cgroup v2), minus what it uses already."""
    root = Path("/sys/fs/cgroup")
    try:
        limit = (root / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int((root / "memory.current").read_text())
    except (OSError, ValueError):
        return None


def _address_space_available() -> int | None:
    """`ulimit -v`: the limit minus this process's current address space."""
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    try:
        for line in Path(f"/proc/{os.getpid()}/status").read_text().splitlines():
            if line.startswith("VmSize:"):
                return soft - int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def available_bytes(device: torch.device) -> int | None:
    """What training on `device` can still allocate; None where it cannot be known."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    known = [b for b in (_meminfo_available(), _cgroup_available(), _address_space_available()) if b is not None]
    return min(known) if known else None


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def memory_refusal(spec: ModelSpec, batch_size: int, device: torch.device) -> str | None:
    """Why this configuration cannot be trained here (one line), or None if it may fit."""
    available = available_bytes(device)
    if available is None:
        return None
    need = training_bytes(spec, batch_size)
    if need <= _USABLE * available:
        return None
    return (f"needs about {_gib(need)} of memory to train ({spec.param_count():,} parameters, batch {batch_size}); "
            f"{_gib(available)} available on {device.type}")


def is_out_of_memory(exc: BaseException) -> bool:
    """torch's CUDA OutOfMemoryError, or the CPU allocator's failure (a RuntimeError)."""
    oom = getattr(torch, "OutOfMemoryError", None)
    text = str(exc)
    return (oom is not None and isinstance(exc, oom)) or "out of memory" in text or "can't allocate memory" in text
