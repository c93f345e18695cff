"""MSMT17: the V1 list-file layout, or the Market-style folder layout some copies use.

List layout: ``train/`` and ``test/`` image folders and ``list_{train,val,query,gallery}.txt``
with lines ``0000/0000_000_01_0303morning_0015_0.jpg 0``; the camera is the third ``_`` field of
the file name (``01`` -> camid 0). As in the official code, list_val is merged into training.
Folder layout: ``bounding_box_train``, ``query``, ``bounding_box_test`` with ``<pid>_c<cam>...``
names (MSMT17_V2 conversions).
"""

from datasets.bases import PID_CAM_PATTERN, PublishedSplit
from datasets.layouts import LayoutChoice, NamePatternLayout, PidListLayout, register_dataset

_DIRS = ("MSMT17", "MSMT17_V1", "MSMT17_V2")

# A full copy (V1 lists: train = list_train + list_val), as the official loader counts it.
PUBLISHED_STATS = {
    "train": PublishedSplit(1_041, 32_621),
    "query": PublishedSplit(3_060, 11_659),
    "gallery": PublishedSplit(3_060, 82_161),
}

MSMT17_LISTS = PidListLayout(
    name="msmt17",
    dataset_dirs=_DIRS,
    train_image_dir="train",
    test_image_dir="test",
    train_lists=("list_train.txt", "list_val.txt"),
    query_list="list_query.txt",
    gallery_list="list_gallery.txt",
    camera_field=2,
    num_cameras=15,
)

MSMT17_FOLDERS = NamePatternLayout(
    name="msmt17",
    dataset_dirs=_DIRS,
    train_dir="bounding_box_train",
    query_dir="query",
    gallery_dir="bounding_box_test",
    pattern=PID_CAM_PATTERN,
    num_cameras=15,
    example_name="0000_c1_0000.jpg",
)

MSMT17 = register_dataset(
    LayoutChoice(
        name="msmt17",
        dataset_dirs=_DIRS,
        layouts=(MSMT17_LISTS, MSMT17_FOLDERS),
        published=PUBLISHED_STATS,
    )
)
