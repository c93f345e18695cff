"""Data side: dataset parsing, transforms, samplers and loaders.

``build_dataloaders(cfg)`` is the entry point; ``DATASET_LAYOUTS`` lists the dataset names.
"""

from datasets.bases import (
    CorruptImageError,
    DatasetFormatError,
    DatasetLayoutError,
    ImageDataset,
    ImageRecord,
    ReIDDataset,
    SplitStats,
    collate_batch,
)
from datasets.build import DATASET_LAYOUTS, DataBundle, build_dataloaders, build_datasets
from datasets.synthetic import generate_synthetic_reid

__all__ = [
    "DATASET_LAYOUTS",
    "CorruptImageError",
    "DataBundle",
    "DatasetFormatError",
    "DatasetLayoutError",
    "ImageDataset",
    "ImageRecord",
    "ReIDDataset",
    "SplitStats",
    "build_dataloaders",
    "build_datasets",
    "collate_batch",
    "generate_synthetic_reid",
]
