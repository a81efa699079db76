"""Eager PyTorch references, one per fused op with the same signature: the numerical ground
truth the tests compare against, the "eager" provider of the benchmarks, and the
`backend="reference"` path. Nothing here imports from the kernels."""
from dtl_fast.reference.cosine_attention import cosine_attention
from dtl_fast.reference.frame_pool import frame_pool
from dtl_fast.reference.rnn import gru, lstm

__all__ = ["cosine_attention", "frame_pool", "gru", "lstm"]
