"""Market-1501: folder names and file-name pattern (parsing: ``layouts.NamePatternLayout``).

Names look like ``0002_c1s1_000451_03.jpg``: pid 2, camera 1 (camid 0). pid -1 marks junk images
(dropped), pid 0 distractors (kept in the gallery).
"""

from datasets.bases import PID_CAM_PATTERN, PublishedSplit
from datasets.layouts import NamePatternLayout, register_dataset

# A full copy as the official loader counts it (junk pid -1 dropped, distractor pid 0 one
# identity): bounding_box_test holds 19,732 files, of which the loader keeps 15,913.
PUBLISHED_STATS = {
    "train": PublishedSplit(751, 12_936),
    "query": PublishedSplit(750, 3_368),
    "gallery": PublishedSplit(751, 15_913),
}

MARKET1501 = register_dataset(
    NamePatternLayout(
        name="market1501",
        dataset_dirs=("Market-1501-v15.09.15", "Market-1501", "market1501"),
        train_dir="bounding_box_train",
        query_dir="query",
        gallery_dir="bounding_box_test",
        pattern=PID_CAM_PATTERN,
        num_cameras=6,
        example_name="0002_c1s1_000451_03.jpg",
        published=PUBLISHED_STATS,
    )
)
