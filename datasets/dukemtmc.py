"""DukeMTMC-reID and Occluded-Duke: one Market-style layout, two folders.

Names look like ``0001_c2_f0046182.jpg``: pid 1, camera 2 (camid 1). Occluded-Duke is the same
layout in another folder; the official code gives its images view 1, here every image has view 0
so that the view vocabulary (size 1) indexes it.
"""

import dataclasses

from datasets.bases import PID_CAM_PATTERN, PublishedSplit
from datasets.layouts import NamePatternLayout, register_dataset

# Full copies: the gallery (shared by both) includes the distractor identities.
PUBLISHED_STATS = {
    "train": PublishedSplit(702, 16_522),
    "query": PublishedSplit(702, 2_228),
    "gallery": PublishedSplit(1_110, 17_661),
}
OCC_DUKE_PUBLISHED_STATS = {
    "train": PublishedSplit(702, 15_618),
    "query": PublishedSplit(519, 2_210),
    "gallery": PublishedSplit(1_110, 17_661),
}

DUKEMTMC = register_dataset(
    NamePatternLayout(
        name="dukemtmc",
        dataset_dirs=("dukemtmcreid/DukeMTMC-reID", "DukeMTMC-reID"),
        train_dir="bounding_box_train",
        query_dir="query",
        gallery_dir="bounding_box_test",
        pattern=PID_CAM_PATTERN,
        num_cameras=8,
        example_name="0001_c2_f0046182.jpg",
        published=PUBLISHED_STATS,
    )
)

OCC_DUKE = register_dataset(
    dataclasses.replace(
        DUKEMTMC,
        name="occ_duke",
        dataset_dirs=("dukemtmcreid/Occluded_Duke", "Occluded_Duke"),
        published=OCC_DUKE_PUBLISHED_STATS,
    )
)
