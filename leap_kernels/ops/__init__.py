"""The ops, one module each (kernels, host code, torch.library registration), and
their plain PyTorch references in :mod:`leap_kernels.ops.naive`."""
