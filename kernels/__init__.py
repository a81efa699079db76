"""Triton kernels and their launchers (installed as dtl_fast.kernels). Kernels here know
nothing of nn.Modules; dtl_fast.ops wraps them as registered custom ops."""
