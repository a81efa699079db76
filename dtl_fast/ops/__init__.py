"""Functional ops: custom-op registration, autograd and the backend choice
("auto" | "fused" | "reference") for every fused kernel of dtl_fast."""
from dtl_fast.ops.cosine_attention import cosine_attention, cosine_attention_composite
from dtl_fast.ops.frame_pool import frame_pool
from dtl_fast.ops.rnn import gru, lstm

__all__ = ["cosine_attention", "cosine_attention_composite", "frame_pool", "gru", "lstm"]
