"""Multimodal (image + video) data: the on-disk folder layout, batching with padded clips, and
the bundled demo data set built from scikit-learn's handwritten digits.

    from dtl_fast.data import MultiModalFolder, collate_multimodal, build_demo_dataset
    root = build_demo_dataset("~/.cache/dtl_fast/demo")          # once; a no-op afterwards
    train = MultiModalFolder(root, "train")
    test = MultiModalFolder(root, "test", classes=train.classes)
    loader = torch.utils.data.DataLoader(train, batch_size=64, collate_fn=collate_multimodal)
    images, videos, lengths, labels = next(iter(loader))          # a MultiModalBatch

    prepare(root, "~/data/demo-prepared", image_size=16, max_frames=8)  # decode once (uint8 arrays)
    train = open_split("~/data/demo-prepared", "train", image_size=16, max_frames=8)  # or a raw root
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
from dtl_fast.data.prepared import PreparedDataError, PreparedSplit, is_prepared, open_split, prepare

__all__ = ["MultiModalFolder", "MultiModalBatch", "collate_multimodal", "BadSampleError",
           "open_split", "is_prepared", "prepare", "PreparedSplit", "PreparedDataError",
           "build_demo_dataset", "IMAGENET_MEAN", "IMAGENET_STD", "SPLITS"]
