"""The interface to the device kernels: which implementation runs on which device.

Callers ask once per call site with the tensor's device and get an object with a fixed contract:
- `linear_layouts(device)`: `linear(x, weight, bias)`, `plan(x, weight, bias)`, `handles(rows,
  weight)`, as in `tah.kernels.plain`; on CPU the measured layouts of `cpu/few_rows.py`.
- `attention_kernels(device)`: an `AttentionKernels` of the masked and grouped-head attention that
  `tah.kernels.sdpa` runs instead of HF's plain sdpa (None: take the plain path).
The CPU layouts are chosen on CPU only, never on CUDA (or any other device).
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import NamedTuple

import torch

import tah.kernels.cpu.attention as cpu_attention
import tah.kernels.cpu.few_rows as few_rows
import tah.kernels.cuda.attention as cuda_attention
import tah.kernels.plain as plain

GPU_PATH_ON_CPU = False  # True: masked attention on CPU takes the CUDA path too (how tests hold it to the rule)


class AttentionKernels(NamedTuple):
    """masked(query, key, value, mask, groups, dropout, scaling) -> (B, A, H, D) for masked calls;
    grouped(same, mask possibly None) for grouped KV heads. None: HF's plain sdpa instead."""
    masked: Callable | None
    grouped: Callable | None


CPU_ATTENTION = AttentionKernels(None, cpu_attention.grouped_attention_cpu)
CPU_WITH_GPU_MASKED = AttentionKernels(cuda_attention.masked_attention_gpu, cpu_attention.grouped_attention_cpu)
GPU_ATTENTION = AttentionKernels(cuda_attention.masked_attention_gpu, None)


def on_cpu(device: torch.device) -> bool:
    """Do the CPU layouts apply on this device?"""
    return device.type == "cpu"


def linear_layouts(device: torch.device) -> ModuleType:
    """The linear layouts for weights on `device`: `few_rows` on CPU, plain F.linear elsewhere."""
    return few_rows if on_cpu(device) else plain


def attention_kernels(device: torch.device) -> AttentionKernels:
    """The attention kernels for queries on `device` (CUDA's masked path on every non-CPU device)."""
    if on_cpu(device):
        return CPU_WITH_GPU_MASKED if GPU_PATH_ON_CPU else CPU_ATTENTION
    return GPU_ATTENTION
