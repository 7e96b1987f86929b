"""CUDA kernels; reached through `tah.kernels.choose`. They run on any device (tests run them on CPU)."""
