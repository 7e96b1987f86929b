"""`HostReads`: counts what would make the host wait for a GPU, on any device (tests and benchmarks).

On a GPU every read of a tensor's value on the host, and every op whose output shape depends on
values, waits for all the kernels queued before it: the host stops running ahead of the device.
On CPU nothing waits, but the same calls happen, so a CPU run counts them.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class HostReads(TorchDispatchMode):
    """Counts, while active (`with HostReads() as reads:`), what would make the host wait for a GPU:
    reads of tensor values (.item, bool(), int(), .tolist(), .numpy()) and ops whose output shape
    depends on tensor values (boolean selection and assignment, nonzero, masked_select,
    repeat_interleave without output_size), which read a count. `count`: how many; `where`: each
    one's op; `ops`: every aten op dispatched (each at least one kernel launch on a GPU)."""

    SHAPE_FROM_VALUES = {"nonzero", "masked_select", "unique", "_unique2", "unique_consecutive"}
    UNDISPATCHED_READS = ("tolist", "numpy")  # reads that make no aten call on CPU: their methods are patched

    def __init__(self) -> None:
        super().__init__()
        self.count, self.where, self.ops = 0, [], 0
        self._originals = {name: getattr(torch.Tensor, name) for name in self.UNDISPATCHED_READS}

    def __enter__(self):
        for name, original in self._originals.items():
            setattr(torch.Tensor, name, self._counting(name, original))
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self._originals.items():
            setattr(torch.Tensor, name, original)
        return super().__exit__(*exc)

    def _counting(self, name, original):
        def counted(tensor, *args, **kwargs):
            self._read(name)
            return original(tensor, *args, **kwargs)
        return counted

    def _read(self, name: str) -> None:
        self.count += 1
        self.where.append(name)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        name = func.overloadpacket.__name__
        if name == "_local_scalar_dense" or name in self.SHAPE_FROM_VALUES:
            self._read(name)
        elif name in ("index", "index_put", "index_put_") and any(
                isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in args[1] if t is not None):
            self._read(f"{name} with a boolean mask")
        elif name == "repeat_interleave" and isinstance(args[0], torch.Tensor) and args[0].dim() > 0 \
                and (kwargs or {}).get("output_size") is None and not (len(args) > 1 and isinstance(args[1], int)):
            self._read(name)
        return func(*args, **(kwargs or {}))
