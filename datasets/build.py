"""Config -> parsed datasets -> data loaders (``build_dataloaders``)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader
from yacs.config import CfgNode

# isort: off
# The dataset files register their layouts in DATASETS when imported, in this order (the order
# DATASETS.NAMES errors list them in).
import datasets.market1501  # noqa: F401
import datasets.msmt17  # noqa: F401
import datasets.dukemtmc  # noqa: F401
import datasets.veri  # noqa: F401
import datasets.vehicleid  # noqa: F401
import datasets.custom  # noqa: F401
import datasets.synthetic  # noqa: F401

# isort: on
from datasets.bases import (
    ISSUE,
    ISSUE_EVALUATION,
    MAX_LISTED,
    CorruptImageError,
    ImageRecord,
    ReIDDataset,
    camera_offsets,
    combine_datasets,
)
from datasets.image_dataset import ImageDataset, check_images_readable, collate_batch
from datasets.layouts import DatasetOptions, get_layout
from datasets.samplers import (
    CameraAwareIdentityBatchSampler,
    EpochBatchSampler,
    FixedLengthBatchSampler,
    RandomIdentityBatchSampler,
    ShuffleBatchSampler,
)
from datasets.transforms import build_transforms
from utils.dist import get_rank, get_world_size

logger = logging.getLogger(__name__)


def dataset_options(cfg: CfgNode) -> DatasetOptions:
    """Collect the dataset settings of a config.

    Args:
        cfg: configuration (DATASETS.*, SOLVER.SEED, MODEL.SIE_VIEW).

    Returns:
        The :class:`DatasetOptions`.
    """
    d = cfg.DATASETS
    syn = d.SYNTHETIC
    return DatasetOptions(
        seed=int(cfg.SOLVER.SEED),
        vehicleid_test_size=int(d.VEHICLEID_TEST_SIZE),
        veri_drop_unlabeled=bool(d.VERI_DROP_UNLABELED),
        veri_keypoint_dir=d.VERI_KEYPOINT_DIR,
        require_views=bool(cfg.MODEL.SIE_VIEW),
        list_file=str(d.LIST_FILE),
        synthetic={
            "num_ids": int(syn.NUM_IDS),
            "num_cameras": int(syn.NUM_CAMERAS),
            "images_per_id_cam": int(syn.IMAGES_PER_ID_CAM),
            "size": [int(v) for v in syn.SIZE],
            "mode": str(syn.MODE),
            "seed": int(syn.SEED),
        },
    )


def dataset_names(cfg: CfgNode) -> list[str]:
    """``DATASETS.NAMES`` as a list.

    Args:
        cfg: configuration.

    Returns:
        The names (a single string becomes a one-element list).
    """
    names = cfg.DATASETS.NAMES
    return [names] if isinstance(names, str) else [str(n) for n in names]


def check_dataset(dataset: ReIDDataset) -> None:
    """Warn about evaluation problems that do not stop a run.

    Args:
        dataset: the (combined) dataset; query/gallery are the evaluated ones.
    """
    gallery_pids = {r.pid for r in dataset.gallery}
    missing = {r.pid for r in dataset.query} - gallery_pids
    if missing:
        n_img = sum(r.pid in missing for r in dataset.query)
        logger.warning(
            "%s: %d query identities (%d images) never appear in the gallery; those queries "
            "are skipped by the evaluation",
            dataset.name,
            len(missing),
            n_img,
            extra={ISSUE: ISSUE_EVALUATION},
        )
    if dataset.has_camera_ids:
        train_cams = {r.camid for r in dataset.train}
        unseen = sorted({r.camid for r in dataset.query + dataset.gallery} - train_cams)
        if unseen:
            logger.warning(
                "%s: camera ids %s of query/gallery never occur in training; their camera "
                "embeddings (MODEL.SIE_CAMERA) would stay untrained",
                dataset.name,
                unseen,
                extra={ISSUE: ISSUE_EVALUATION},
            )


def build_datasets(cfg: CfgNode) -> tuple[ReIDDataset, list[ReIDDataset]]:
    """Parse every dataset of ``DATASETS.NAMES`` and combine them for training.

    Args:
        cfg: configuration.

    Returns:
        (combined dataset: train of all, query/gallery of the first; the parsed datasets).
    """
    options = dataset_options(cfg)
    parts = []
    for name in dataset_names(cfg):
        ds = get_layout(name).load(cfg.DATASETS.ROOT_DIR, options)
        logger.info("%s", ds.format_statistics())
        parts.append(ds)
    dataset = combine_datasets(parts)
    if len(parts) > 1:
        logger.info("training on %s", dataset.name)
        logger.info("%s", dataset.format_statistics())
    check_dataset(dataset)
    return dataset, parts


def check_eval_images(dataset: ReIDDataset, skip_corrupt: bool) -> ReIDDataset:
    """Check that every query/gallery image can be read, before a run spends time on training.

    Uses the cheap header check of :func:`~datasets.image_dataset.check_images_readable`
    (about 2 s for 20k small JPEGs). An unreadable evaluation image is never replaced by another
    one (that would evaluate the replacement as the original): it fails the run, or with
    ``skip_corrupt`` is left out of the query/gallery (and VehicleID test pool), each logged.

    Args:
        dataset: the (combined) dataset; its query/gallery are the evaluated ones.
        skip_corrupt: ``DATASETS.SKIP_CORRUPT``.

    Returns:
        ``dataset`` itself when every image is readable, else a copy without the unreadable ones.

    Raises:
        CorruptImageError: unreadable images and not ``skip_corrupt``; names the first ones.
    """
    records = (
        dataset.test_pool if dataset.test_pool is not None else dataset.query + dataset.gallery
    )
    bad = check_images_readable(records, f"{dataset.name} query/gallery")
    if not bad:
        return dataset
    listed = "\n".join(f"  {b.path}: {b.reason}" for b in bad[:MAX_LISTED])
    more = f"\n  ... and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
    if not skip_corrupt:
        raise CorruptImageError(
            f"{dataset.name}: {len(bad)} query/gallery image(s) cannot be read:\n{listed}{more}\n"
            "Replace or delete them, or set DATASETS.SKIP_CORRUPT True to leave them out of the "
            "evaluation (python -m tools.check_dataset reports every problem of a dataset)."
        )
    for b in bad[:MAX_LISTED]:
        logger.warning(
            "%s: unreadable query/gallery image left out of the evaluation: %s (%s)",
            dataset.name,
            b.path,
            b.reason,
        )
    reduced = dataset.without_images(b.path for b in bad)
    logger.warning(
        "%s: %d unreadable query/gallery image(s) left out of the evaluation "
        "(DATASETS.SKIP_CORRUPT): query %d -> %d images, gallery %d -> %d images",
        dataset.name,
        len(bad),
        len(dataset.query),
        len(reduced.query),
        len(dataset.gallery),
        len(reduced.gallery),
    )
    return reduced


def _shift_cameras(dataset: ReIDDataset, offset: int) -> ReIDDataset:
    """The dataset with its query/gallery/test-pool camera ids moved by ``offset``."""
    if not offset or not dataset.has_camera_ids:
        return dataset  # placeholder camids (query 0, gallery 1) stay as they are

    def shift(records: list[ImageRecord]) -> list[ImageRecord]:
        return [r._replace(camid=r.camid + offset) for r in records]

    pool = dataset.test_pool
    return dataclasses.replace(
        dataset,
        query=shift(dataset.query),
        gallery=shift(dataset.gallery),
        test_pool=shift(pool) if pool is not None else None,
    )


def _ids_fit(test: ReIDDataset, train: ReIDDataset) -> bool:
    """Whether every camera/view id of a test set indexes the training vocabularies."""
    records = test.test_pool if test.test_pool is not None else test.query + test.gallery
    return all(r.camid < train.num_cameras and r.viewid < train.num_views for r in records)


def build_test_sets(
    cfg: CfgNode,
    dataset: ReIDDataset,
    parts: list[ReIDDataset],
    make_loader: Callable[[ReIDDataset], DataLoader],
) -> list[TestSet]:
    """The evaluated sets: each of ``DATASETS.TEST_NAMES``, or the first of ``DATASETS.NAMES``.

    A test set that is one of the training datasets keeps the camera numbering of training
    (shifted as :func:`~datasets.bases.combine_datasets` shifts it), so an SIE model gets its
    trained camera ids; any other dataset is a cross-domain set, evaluated without ids (the
    model's ``TEST.SIE_FALLBACK``). Every query/gallery image is checked for readability.

    Args:
        cfg: configuration (DATASETS.*, TEST.VEHICLEID_TRIALS).
        dataset: the combined training dataset, its evaluation images already checked.
        parts: the parsed datasets of ``DATASETS.NAMES``.
        make_loader: query + gallery records of a dataset -> its evaluation loader.

    Returns:
        The :class:`TestSet` list, in ``DATASETS.TEST_NAMES`` order.

    Raises:
        CorruptImageError: an unreadable query/gallery image without ``DATASETS.SKIP_CORRUPT``.
    """
    trials = int(cfg.TEST.VEHICLEID_TRIALS)

    def test_set(name: str, ds: ReIDDataset, ids_known: bool) -> TestSet:
        num_trials = trials if ds.has_trials else 1
        return TestSet(name, make_loader(ds), len(ds.query), num_trials, ds, ids_known)

    train_names = dataset_names(cfg)
    if not cfg.DATASETS.TEST_NAMES:
        return [test_set(train_names[0], dataset, True)]
    skip = bool(cfg.DATASETS.SKIP_CORRUPT)
    offsets = camera_offsets(parts)
    # Cross-domain sets: their view labels are not needed (the model is not given them).
    options = dataclasses.replace(dataset_options(cfg), require_views=False)
    tests = []
    for name in cfg.DATASETS.TEST_NAMES:
        if name in train_names:
            j = train_names.index(name)
            ds = dataset if j == 0 else _shift_cameras(parts[j], offsets[j])
            ids_known = _ids_fit(ds, dataset)
            if not ids_known:
                logger.warning(
                    "%s: query/gallery camera or view ids outside the training ones; evaluated "
                    "without them (TEST.SIE_FALLBACK for SIE models)",
                    name,
                )
        else:
            ds = get_layout(name).load(cfg.DATASETS.ROOT_DIR, options)
            logger.info("%s", ds.format_statistics())
            ids_known = False
        if ds is not dataset:
            ds = check_eval_images(ds, skip)
        tests.append(test_set(name, ds, ids_known))
    cross = [t.name for t in tests if t.name not in train_names]
    logger.info(
        "evaluating on %s%s",
        ", ".join(t.name for t in tests),
        f" (cross-domain: {', '.join(cross)})" if cross else "",
    )
    return tests


def seed_worker(worker_id: int) -> None:
    """Seed python's and numpy's RNGs in a loader worker from its torch seed.

    Args:
        worker_id: the worker's index (unused: torch's per-worker seed already includes it).
    """
    import random

    seed = torch.initial_seed() % (2**32)
    random.seed(seed)
    np.random.seed(seed)


@dataclass
class TestSet:
    """One evaluated query/gallery set (``DATASETS.TEST_NAMES``, or the first of NAMES).

    It has the attributes ``processor.evaluate.evaluate_trials`` reads from a bundle.

    Attributes:
        name: the dataset name.
        val: query images then gallery images, test transforms, ``TEST.IMS_PER_BATCH``.
        num_query: the first ``num_query`` items of ``val`` are queries.
        num_trials: evaluation trials to average (VehicleID: ``TEST.VEHICLEID_TRIALS``, else 1).
        dataset: the parsed dataset whose query/gallery (and VehicleID trials) are evaluated;
            camera ids in the numbering of training when ``ids_known``.
        ids_known: the camera/view ids are those the model was trained with (the set belongs to
            a dataset of ``DATASETS.NAMES``); otherwise (cross-domain) an SIE model is not given
            them and uses ``TEST.SIE_FALLBACK``.
    """

    name: str
    val: DataLoader
    num_query: int
    num_trials: int
    dataset: ReIDDataset
    ids_known: bool = True


@dataclass
class DataBundle:
    """Everything the training and evaluation loops need from the data side.

    Attributes:
        train_stage1: train set, test transforms, ``SOLVER.STAGE1.IMS_PER_BATCH``, in order
            (stage 1 caches one feature per image; labels travel with the features).
        train_stage2: train set, train transforms, P x K identity batches
            (``DATALOADER.SAMPLER 'softmax_triplet'``, camera-aware with
            ``DATALOADER.CAMERA_AWARE``) or shuffled batches ('softmax'), one sampler pass or
            ``DATALOADER.ITERS_PER_EPOCH`` batches per epoch; its
            ``batch_sampler`` has ``set_epoch``.
        val: ``tests[0].val``: query images then gallery images of the first test set.
        train_eval: train set, test transforms, ``TEST.IMS_PER_BATCH``, in order.
        num_classes: training identities C.
        num_cameras: camera vocabulary size (camids are 0..num_cameras-1).
        num_views: viewpoint vocabulary size.
        num_query: ``tests[0].num_query``: the first ``num_query`` items of ``val`` are queries.
        num_trials: ``tests[0].num_trials``.
        dataset: the combined dataset (train of all, query/gallery of the first of NAMES).
        datasets: the parsed datasets in ``DATASETS.NAMES`` order.
        tests: the evaluated sets: one per ``DATASETS.TEST_NAMES`` entry, or the first of
            ``DATASETS.NAMES`` (``dataset``'s query/gallery) when that list is empty.
    """

    train_stage1: DataLoader
    train_stage2: DataLoader
    val: DataLoader
    train_eval: DataLoader
    num_classes: int
    num_cameras: int
    num_views: int
    num_query: int
    num_trials: int
    dataset: ReIDDataset
    datasets: list[ReIDDataset]
    tests: list[TestSet]
    _make_train: Callable[[list[ImageRecord]], DataLoader] = field(repr=False)

    def set_train_labels(self, indices: Sequence[int], labels: Sequence[int]) -> DataLoader:
        """Train stage 2 on a subset of the train set with new labels (e.g. cluster pseudo labels).

        Rebuilds ``train_stage2`` (dataset, batch sampler, loader; same transforms, batch size,
        sampler kind and seed) over the records ``dataset.train[indices]``, each carrying its new
        label as ``pid``: its batches yield those labels in ``batch['pids']`` and the P x K
        sampler groups by them. The ground-truth pids of the records are not read.

        Args:
            indices: ``[M]`` distinct indices into ``dataset.train`` (and ``train_eval``).
            labels: ``[M]`` labels in ``0..K-1``, every value used.

        Returns:
            The new ``train_stage2`` loader (also stored on the bundle).

        Raises:
            ValueError: lengths differ, an index is out of range or repeated, or the labels are
                not exactly ``0..K-1``.
        """
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        lab = np.asarray(labels, dtype=np.int64).reshape(-1)
        n = len(self.dataset.train)
        if idx.shape != lab.shape or idx.size == 0:
            raise ValueError(f"need as many labels as indices (> 0), got {idx.size}, {lab.size}")
        if idx.min() < 0 or idx.max() >= n or np.unique(idx).size != idx.size:
            raise ValueError(f"indices must be distinct and in [0, {n})")
        if not np.array_equal(np.unique(lab), np.arange(int(lab.max()) + 1)):
            raise ValueError("labels must use every value 0..K-1")
        train = self.dataset.train
        pairs = zip(idx.tolist(), lab.tolist(), strict=True)
        records = [train[i]._replace(pid=int(p)) for i, p in pairs]
        self.train_stage2 = self._make_train(records)
        return self.train_stage2


def _loader_kwargs(num_workers: int, seed: int, persistent: bool) -> dict:
    generator = torch.Generator()
    generator.manual_seed(int(seed) % (2**63))
    return {
        "num_workers": num_workers,
        "pin_memory": torch.cuda.is_available(),
        "persistent_workers": persistent and num_workers > 0,
        "worker_init_fn": seed_worker,
        "generator": generator,
        "collate_fn": collate_batch,
    }


def build_train_sampler(
    pids: Sequence[int],
    sampler: str,
    batch_size: int,
    num_instances: int,
    seed: int,
    rank: int | None = None,
    world_size: int | None = None,
    iters_per_epoch: int = 0,
    camids: Sequence[int] | None = None,
    camera_aware: bool = False,
) -> EpochBatchSampler | FixedLengthBatchSampler:
    """The stage-2 batch sampler.

    Args:
        pids: pid of every training index.
        sampler: 'softmax_triplet' (P x K) or 'softmax' (shuffled).
        batch_size: global batch (``SOLVER.STAGE2.IMS_PER_BATCH``), split evenly over ranks.
        num_instances: K.
        seed: run seed.
        rank: process rank (None: from torch.distributed).
        world_size: number of processes (None: from torch.distributed).
        iters_per_epoch: batches per epoch, restarting the sampler when it runs out
            (:class:`FixedLengthBatchSampler`); 0 = one pass of the sampler.
        camids: camera id of every training index (needed by ``camera_aware``).
        camera_aware: P x K batches whose images of an identity come from other cameras than
            its anchor's (:class:`CameraAwareIdentityBatchSampler`); 'softmax_triplet' only.

    Returns:
        A batch sampler with ``set_epoch`` that yields ``SampleKey`` batches.

    Raises:
        ValueError: an unknown sampler, or a batch that does not split into ranks of P x K.
    """
    world_size = get_world_size() if world_size is None else world_size
    rank = get_rank() if rank is None else rank
    if batch_size % world_size:
        raise ValueError(
            f"SOLVER.STAGE2.IMS_PER_BATCH = {batch_size} does not split over {world_size} processes"
        )
    per_rank = batch_size // world_size
    if iters_per_epoch < 0:
        raise ValueError(f"DATALOADER.ITERS_PER_EPOCH = {iters_per_epoch} must be >= 0")
    if camera_aware and (sampler != "softmax_triplet" or camids is None):
        raise ValueError(
            "DATALOADER.CAMERA_AWARE needs DATALOADER.SAMPLER 'softmax_triplet' (P x K batches) "
            "and the camera ids of the training images"
        )
    one_pass: EpochBatchSampler
    if sampler == "softmax_triplet":
        if per_rank % num_instances:
            raise ValueError(
                f"per-process batch {per_rank} is not a multiple of DATALOADER.NUM_INSTANCE = "
                f"{num_instances}"
            )
        if camera_aware:
            one_pass = CameraAwareIdentityBatchSampler(
                pids, camids, per_rank, num_instances, seed, rank, world_size, sample_seeds=True
            )
        else:
            one_pass = RandomIdentityBatchSampler(
                pids, per_rank, num_instances, seed, rank, world_size, sample_seeds=True
            )
    elif sampler == "softmax":
        one_pass = ShuffleBatchSampler(
            len(pids),
            per_rank,
            seed,
            drop_last=True,
            rank=rank,
            world_size=world_size,
            sample_seeds=True,
        )
    else:
        raise ValueError(f"DATALOADER.SAMPLER = {sampler!r}; valid: 'softmax_triplet', 'softmax'")
    if iters_per_epoch:
        return FixedLengthBatchSampler(one_pass, iters_per_epoch)
    return one_pass


def build_dataloaders(cfg: CfgNode) -> DataBundle:
    """Parse the datasets, check the evaluation images and build every loader of a run.

    Every query/gallery image is checked for readability first (:func:`check_eval_images`), so
    a broken evaluation image stops the run here rather than after training.

    Args:
        cfg: configuration (DATASETS, INPUT, DATALOADER, SOLVER.SEED, SOLVER.STAGE1/2
            .IMS_PER_BATCH, TEST.IMS_PER_BATCH, TEST.VEHICLEID_TRIALS, MODEL.SIE_VIEW).

    Returns:
        The :class:`DataBundle`.

    Raises:
        CorruptImageError: an unreadable query/gallery image without ``DATASETS.SKIP_CORRUPT``.
    """
    dataset, parts = build_datasets(cfg)
    skip = bool(cfg.DATASETS.SKIP_CORRUPT)
    dataset = check_eval_images(dataset, skip)
    train_tf, test_tf = build_transforms(cfg)
    workers = int(cfg.DATALOADER.NUM_WORKERS)
    seed = int(cfg.SOLVER.SEED)
    train_test = ImageDataset(dataset.train, test_tf, skip)

    def make_train(records: list[ImageRecord]) -> DataLoader:
        sampler = build_train_sampler(
            [r.pid for r in records],
            cfg.DATALOADER.SAMPLER,
            int(cfg.SOLVER.STAGE2.IMS_PER_BATCH),
            int(cfg.DATALOADER.NUM_INSTANCE),
            seed,
            iters_per_epoch=int(cfg.DATALOADER.ITERS_PER_EPOCH),
            camids=[r.camid for r in records],
            camera_aware=bool(cfg.DATALOADER.CAMERA_AWARE),
        )
        return DataLoader(
            ImageDataset(records, train_tf, skip),
            batch_sampler=sampler,
            **_loader_kwargs(workers, seed, persistent=True),
        )

    train_stage2 = make_train(list(dataset.train))
    train_stage1 = DataLoader(
        train_test,
        batch_size=int(cfg.SOLVER.STAGE1.IMS_PER_BATCH),
        shuffle=False,
        **_loader_kwargs(workers, seed + 1, persistent=False),
    )
    train_eval = DataLoader(
        train_test,
        batch_size=int(cfg.TEST.IMS_PER_BATCH),
        shuffle=False,
        **_loader_kwargs(workers, seed + 2, persistent=False),
    )

    def make_eval_loader(ds: ReIDDataset) -> DataLoader:
        return DataLoader(  # never replaces an image: unreadable ones were left out before
            ImageDataset(ds.query + ds.gallery, test_tf, skip_corrupt=False),
            batch_size=int(cfg.TEST.IMS_PER_BATCH),
            shuffle=False,
            **_loader_kwargs(workers, seed + 3, persistent=False),
        )

    tests = build_test_sets(cfg, dataset, parts, make_eval_loader)

    return DataBundle(
        train_stage1=train_stage1,
        train_stage2=train_stage2,
        val=tests[0].val,
        train_eval=train_eval,
        num_classes=dataset.num_train_pids,
        num_cameras=dataset.num_cameras,
        num_views=dataset.num_views,
        num_query=tests[0].num_query,
        num_trials=tests[0].num_trials,
        dataset=dataset,
        datasets=parts,
        tests=tests,
        _make_train=make_train,
    )
