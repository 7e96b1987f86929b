"""Device-specific kernels and layouts, each behind a plain PyTorch fallback.

- `choose.py`: the interface. Picks, per device, the implementation callers run (the CPU layouts on
  CPU, never on CUDA); model/ and generation/ go through it, not through the device modules.
- `plain.py`: the fallbacks, plain PyTorch as HF computes it, on any device.
- `cpu/`: `few_rows.py` (decode-sized linears in the layout BLAS runs fastest), `attention.py`
  (grouped KV heads without HF's copy under a mask).
- `cuda/`: `attention.py` (masked attention with a KV group's heads packed as its queries, on the
  memory-efficient kernel).
- `sdpa.py`: the `tah_sdpa` attention registered with HF, dispatching by device through `choose`.
- `shared_head.py`, `rows_grad.py`: the training step's LM-head and gradient tricks, for any device
  (tests hold them against plain autograd).

This __init__ imports nothing, so importing one module here loads no other.
"""
