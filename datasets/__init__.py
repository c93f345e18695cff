"""Data side: dataset parsing, transforms, samplers and loaders.

``build_dataloaders(cfg)`` is the entry point. ``DATASETS`` is the registry of dataset layouts
(the ``DATASETS.NAMES`` vocabulary); ``register_dataset(layout)`` adds a format without editing
the package.
"""

from datasets.bases import (
    CorruptImageError,
    DatasetFormatError,
    DatasetLayoutError,
    ImageRecord,
    ReIDDataset,
    SplitStats,
    UnknownDatasetError,
)
from datasets.build import DataBundle, build_dataloaders, build_datasets
from datasets.image_dataset import ImageDataset, collate_batch
from datasets.layouts import DATASETS, DatasetOptions, Layout, get_layout, register_dataset
from datasets.synthetic import generate_synthetic_reid

__all__ = [
    "DATASETS",
    "CorruptImageError",
    "DataBundle",
    "DatasetFormatError",
    "DatasetLayoutError",
    "DatasetOptions",
    "ImageDataset",
    "ImageRecord",
    "Layout",
    "ReIDDataset",
    "SplitStats",
    "UnknownDatasetError",
    "build_dataloaders",
    "build_datasets",
    "collate_batch",
    "generate_synthetic_reid",
    "get_layout",
    "register_dataset",
]
