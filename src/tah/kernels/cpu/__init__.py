"""CPU layouts (MKL/BLAS-shaped); reached through `tah.kernels.choose`."""
