"""DukeMTMC-reID and Occluded-Duke: one Market-style layout, two folders.

Names look like ``0001_c2_f0046182.jpg``: pid 1, camera 2 (camid 1). Occluded-Duke is the same
layout in another folder; the official code gives its images view 1, here every image has view 0
so that the view vocabulary (size 1) indexes it.
"""

import dataclasses

from datasets.bases import PID_CAM_PATTERN
from datasets.layouts import NamePatternLayout, register_dataset

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
    )
)

OCC_DUKE = register_dataset(
    dataclasses.replace(
        DUKEMTMC, name="occ_duke", dataset_dirs=("dukemtmcreid/Occluded_Duke", "Occluded_Duke")
    )
)
