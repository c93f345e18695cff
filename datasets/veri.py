"""VeRi-776: folder names, file-name pattern and viewpoint files.

Names look like ``0001_c001_00016450_0.jpg``: pid 1, camera 1 (camid 0), 20 cameras. Viewpoints
(0..7) come from ``keypoint_train.txt`` / ``keypoint_test.txt`` (last number of each line), read
from the VeRi folder or ``DATASETS.VERI_KEYPOINT_DIR``. Images without a label keep view index 8
('unknown') unless ``DATASETS.VERI_DROP_UNLABELED`` or ``MODEL.SIE_VIEW`` drops them.
"""

from datasets.bases import PID_CAM_PATTERN, VeRiLayout

VERI = VeRiLayout(
    name="veri",
    dataset_dirs=("VeRi", "VeRi-776", "VeRi776"),
    train_dir="image_train",
    query_dir="image_query",
    gallery_dir="image_test",
    pattern=PID_CAM_PATTERN,
    num_cameras=20,
    example_name="0001_c001_00016450_0.jpg",
    keypoint_files=("keypoint_train.txt", "keypoint_test.txt"),
    num_labelled_views=8,
)
