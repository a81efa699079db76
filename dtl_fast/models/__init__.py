"""The DTL model assembled from dtl_fast.nn, its loss, and the single-modality baselines.

    from dtl_fast.models import DTL, DTLOutput, dtl_loss, ImageBaseline, VideoBaseline, ConvEncoder
"""
from dtl_fast.models.baselines import ImageBaseline, VideoBaseline
from dtl_fast.models.dtl import DTL, DTLOutput, dtl_loss
from dtl_fast.models.encoders import ConvEncoder, ResNet18Encoder, SpatialReadout, build_encoder

__all__ = ["DTL", "DTLOutput", "dtl_loss", "ImageBaseline", "VideoBaseline", "ConvEncoder",
           "ResNet18Encoder", "SpatialReadout", "build_encoder"]
