"""Recording: the hooked pass, fused statistics and kernels, the HDF5 run (write, read) and its damage probe."""
