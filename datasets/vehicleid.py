"""VehicleID: image folder and split lists.

``train_test_split/train_list.txt`` and ``test_list_{800,1600,2400}.txt`` hold lines
``<image name> <pid>`` (the name without ``.jpg``). Each evaluation trial puts one random image per
test identity in the gallery and the rest in the query (seeded by ``SOLVER.SEED`` and the trial).
"""

from datasets.bases import VehicleIDLayout

VEHICLEID = VehicleIDLayout(
    name="VehicleID",
    dataset_dirs=("VehicleID_V1.0", "VehicleID"),
    image_dir="image",
    split_dir="train_test_split",
    train_list="train_list.txt",
    test_list="test_list_{size}.txt",
    test_sizes=(800, 1600, 2400),
    image_ext=".jpg",
)
