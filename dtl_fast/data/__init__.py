"""Multimodal (image + video) data: the on-disk folder layout, batching with padded clips, and
the bundled demo data set built from scikit-learn's handwritten digits.

    from dtl_fast.data import MultiModalFolder, collate_multimodal, build_demo_dataset
    root = build_demo_dataset("~/.cache/dtl_fast/demo")          # once; a no-op afterwards
    train = MultiModalFolder(root, "train")
    test = MultiModalFolder(root, "test", classes=train.classes)
    loader = torch.utils.data.DataLoader(train, batch_size=64, collate_fn=collate_multimodal)
    images, videos, lengths, labels = next(iter(loader))          # a MultiModalBatch
"""
from dtl_fast.data.demo import build_demo_dataset
from dtl_fast.data.folder import (
                                  IMAGENET_MEAN,
                                  IMAGENET_STD,
                                  SPLITS,
                                  BadSampleError,
                                  MultiModalBatch,
                                  MultiModalFolder,
                                  collate_multimodal,
)
from dtl_fast.data.prepared import is_prepared, open_split

__all__ = ["open_split", "is_prepared", "MultiModalFolder", "MultiModalBatch", "collate_multimodal", "BadSampleError",
           "build_demo_dataset", "IMAGENET_MEAN", "IMAGENET_STD", "SPLITS"]
