"""Custom data without code: identity folders ('folder') or one CSV/TSV list ('csv').

'folder': ``DATASETS.ROOT_DIR/{train,query,gallery}/<identity>/<images>``; an optional camera
token ``c<N>`` / ``cam<N>`` in the file name (e.g. ``img_c2_0001.jpg``) gives the camera.
'csv': ``DATASETS.LIST_FILE`` with a header naming ``path, pid, split`` and optionally
``camid, viewid``; comma- or tab-separated.
"""

from datasets.bases import SPLITS, CsvLayout, FolderLayout

FOLDER = FolderLayout(
    name="folder",
    dataset_dirs=("",),
    split_dirs=SPLITS,
    camera_pattern=r"(?:^|[_\-])c(?:am)?(\d+)",
)

CSV = CsvLayout(
    name="csv",
    dataset_dirs=("",),
    required_columns=("path", "pid", "split"),
    optional_columns=("camid", "viewid"),
    split_names=SPLITS,
)
