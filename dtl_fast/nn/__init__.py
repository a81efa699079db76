"""torch.nn modules backed by dtl_fast's fused kernels: LSTM and GRU (drop-in replacements for
torch.nn.LSTM / GRU, also put in place by swap_modules), CosineAttention (called like
nn.MultiheadAttention, not a drop-in for it: batch-first, one output), FeatureExchange,
DualModalAttention and FramePool. None of them is TorchScript-scriptable: torch.jit.script
raises NotScriptableError; torch.compile, torch.export and torch.jit.trace work."""
from dtl_fast.nn.attention import CosineAttention, DualModalAttention, FeatureExchange
from dtl_fast.nn.pooling import FramePool
from dtl_fast.nn.rnn import GRU, LSTM, NotScriptableError
from dtl_fast.nn.swap import swap_modules

__all__ = ["GRU", "LSTM", "CosineAttention", "DualModalAttention", "FeatureExchange", "FramePool",
           "NotScriptableError", "swap_modules"]
