"""Sequence-mixing kernels in pure PyTorch: attention, Mamba-1 selective scan, Mamba-2 SSD."""
