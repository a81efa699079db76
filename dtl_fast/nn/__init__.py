"""Drop-in torch.nn modules backed by dtl_fast's fused kernels."""
from dtl_fast.nn.attention import CosineAttention, DualModalAttention, FeatureExchange
from dtl_fast.nn.pooling import FramePool
from dtl_fast.nn.rnn import GRU, LSTM
from dtl_fast.nn.swap import swap_modules

__all__ = ["GRU", "LSTM", "CosineAttention", "DualModalAttention", "FeatureExchange", "FramePool",
           "swap_modules"]
