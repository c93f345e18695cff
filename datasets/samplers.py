"""Batch samplers of the training loaders: P x K identity batches (plain or camera-aware) and
plain shuffled batches.

Both are *batch* samplers (they yield lists of indices) whose epoch is a pure function of
``(seed, epoch)``: ``set_epoch(epoch)`` replaces the global random state of the official samplers,
so a resumed run replays the same batches and ``len()`` is exact. In a distributed run every rank
builds the same global batch list (no communication needed) and keeps a disjoint share of it:
batches ``rank, rank + W, rank + 2W, ...``, truncated so every rank gets as many.

With ``sample_seeds=True`` each index comes as a :class:`~datasets.image_dataset.SampleKey`
``(index, seed)``; :class:`~datasets.image_dataset.ImageDataset` seeds the augmentation of that
sample with it, which makes augmentations independent of the number of loader workers.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

from datasets.image_dataset import SampleKey
from utils.dist import get_rank, get_world_size

logger = logging.getLogger(__name__)


class EpochBatchSampler(Sampler[list]):
    """Base class: per-epoch global batch list, rank share, optional per-sample seeds.

    Args:
        seed: run seed (``SOLVER.SEED``).
        rank: this process's rank; None reads torch.distributed (0 without a process group).
        world_size: number of processes; None reads torch.distributed (1 without one).
        sample_seeds: yield ``SampleKey(index, seed)`` instead of plain indices.
    """

    def __init__(
        self,
        seed: int,
        rank: int | None = None,
        world_size: int | None = None,
        sample_seeds: bool = False,
    ) -> None:
        self.seed = int(seed) % (2**64)
        self.world_size = get_world_size() if world_size is None else int(world_size)
        self.rank = get_rank() if rank is None else int(rank)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside 0..{self.world_size - 1}")
        self.sample_seeds = sample_seeds
        self.epoch = 0
        self._skip = 0
        self._cache: tuple[tuple[int, int], list[list]] | None = None

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose batches the next iteration yields.

        Args:
            epoch: any integer (the training loop's epoch counter).
        """
        self.epoch = int(epoch)

    def skip_next(self, num_batches: int) -> None:
        """Make the next iteration start after its first ``num_batches`` batches (a resumed epoch).

        The skipped batches are neither yielded nor loaded; ``len`` stays the epoch's length.

        Args:
            num_batches: batches of the current epoch already trained on.
        """
        self._skip = int(num_batches)

    def global_batches(self, rng: np.random.Generator) -> list[list[int]]:
        """All batches of one epoch before the rank split.

        Args:
            rng: the epoch's generator, seeded by (seed, epoch).

        Returns:
            Batches of dataset indices.
        """
        raise NotImplementedError

    def epoch_batches(self, pass_index: int = 0) -> list[list]:
        """This rank's batches of one pass of the current epoch (cached per epoch and pass).

        Pass 0 is the epoch's batch list; pass ``k > 0`` is a fresh draw (new order, new
        augmentation seeds) for loops that restart the sampler within an epoch
        (:class:`FixedLengthBatchSampler`). Every pass is a pure function of
        ``(seed, epoch, pass_index)``.

        Args:
            pass_index: which pass of the epoch, >= 0.

        Returns:
            Lists of indices, or of ``SampleKey`` with ``sample_seeds``.
        """
        key = (self.epoch, int(pass_index))
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        words = [self.seed, self.epoch % (2**64)]
        # Pass k > 0 adds a word to each stream's seed; pass 0 keeps the plain epoch seed.
        extra = [int(pass_index)] if pass_index else []
        batches = self.global_batches(np.random.default_rng([*words, 0, *extra]))
        if self.sample_seeds:
            # A separate stream, so the seeds never change which indices are drawn.
            seed_rng = np.random.default_rng([*words, 1, *extra])
            seeds = seed_rng.integers(0, 2**63, size=sum(len(b) for b in batches))
            flat = iter(seeds.tolist())
            batches = [[SampleKey(i, next(flat)) for i in b] for b in batches]
        usable = len(batches) - len(batches) % self.world_size
        mine = batches[self.rank : usable : self.world_size]
        self._cache = (key, mine)
        return mine

    def __iter__(self) -> Iterator[list]:
        """Yield this rank's batches of the current epoch (after any :meth:`skip_next`)."""
        skip, self._skip = self._skip, 0
        yield from (list(b) for b in self.epoch_batches()[skip:])

    def __len__(self) -> int:
        """Exact number of batches this rank yields in the current epoch."""
        return len(self.epoch_batches())


class RandomIdentityBatchSampler(EpochBatchSampler):
    """P x K batches: P identities, K images each (the official RandomIdentitySampler).

    Per epoch: each identity's indices are shuffled (drawn with replacement up to K when it has
    fewer than K images) and cut into K-image chunks, dropping the remainder; then, while at least
    P identities have chunks left, P distinct ones are drawn at random and each gives its next
    chunk. With fewer than P identities in the dataset, P becomes their number (a warning says so)
    instead of yielding an empty epoch.

    Args:
        pids: the pid of every dataset index.
        batch_size: images per batch on this rank, P * K.
        num_instances: K.
        seed: run seed.
        rank: see :class:`EpochBatchSampler`.
        world_size: see :class:`EpochBatchSampler`.
        sample_seeds: see :class:`EpochBatchSampler`.
    """

    def __init__(
        self,
        pids: Sequence[int],
        batch_size: int,
        num_instances: int,
        seed: int,
        rank: int | None = None,
        world_size: int | None = None,
        sample_seeds: bool = False,
    ) -> None:
        super().__init__(seed, rank, world_size, sample_seeds)
        if num_instances < 1 or batch_size < num_instances or batch_size % num_instances:
            raise ValueError(
                f"batch size {batch_size} must be a positive multiple of K = {num_instances}"
            )
        self.num_instances = int(num_instances)
        index_by_pid: dict[int, list[int]] = defaultdict(list)
        for i, pid in enumerate(pids):
            index_by_pid[int(pid)].append(i)
        if not index_by_pid:
            raise ValueError("cannot sample identity batches from an empty training split")
        self.pids = sorted(index_by_pid)
        self._index_by_pid = [np.asarray(index_by_pid[p], dtype=np.int64) for p in self.pids]
        self.num_identities = min(batch_size // num_instances, len(self.pids))
        if self.num_identities < batch_size // num_instances:
            logger.warning(
                "only %d training identities, fewer than P = %d // %d = %d: batches hold %d "
                "identities x %d images",
                len(self.pids),
                batch_size,
                num_instances,
                batch_size // num_instances,
                self.num_identities,
                num_instances,
            )

    def global_batches(self, rng: np.random.Generator) -> list[list[int]]:  # noqa: D102
        k, p = self.num_instances, self.num_identities
        chunks: list[list[list[int]]] = []
        for idxs in self._index_by_pid:
            if len(idxs) < k:
                idxs = rng.choice(idxs, size=k, replace=True)
            else:
                idxs = rng.permutation(idxs)
            usable = len(idxs) - len(idxs) % k
            chunks.append([idxs[i : i + k].tolist() for i in range(0, usable, k)])
        next_chunk = [0] * len(chunks)
        available = list(range(len(chunks)))
        batches = []
        while len(available) >= p:
            picks = rng.choice(len(available), size=p, replace=False)
            batch: list[int] = []
            exhausted = []
            for pos in picks.tolist():
                ident = available[pos]
                batch += chunks[ident][next_chunk[ident]]
                next_chunk[ident] += 1
                if next_chunk[ident] == len(chunks[ident]):
                    exhausted.append(pos)
            for pos in sorted(exhausted, reverse=True):
                available.pop(pos)
            batches.append(batch)
        return batches


class CameraAwareIdentityBatchSampler(RandomIdentityBatchSampler):
    """P x K batches whose K images of an identity span its cameras (``DATALOADER.CAMERA_AWARE``).

    ClusterContrast's ``RandomMultipleGallerySampler``, which the PCL-CLIP USL reproduction
    trains with. Per pass: the identities in random order; for each, one anchor image at random,
    then K - 1 more images of the identity drawn from the images of OTHER cameras than the
    anchor's (without replacement when there are at least K of them, else with replacement, as
    the original); an identity seen by one camera only draws them from its other images the same
    way, and an identity with a single image contributes the anchor alone. The sequence of all
    identities' images is cut into batches of P * K, the incomplete last one dropped. So a pass
    shows every identity once, K images each (against all of an identity's images in K-chunks
    for :class:`RandomIdentityBatchSampler`). With fewer than P identities, P becomes their
    number (a warning says so) instead of yielding no batch.

    Args:
        pids: the pid of every dataset index.
        camids: the camera id of every dataset index.
        batch_size: images per batch on this rank, P * K.
        num_instances: K.
        seed: run seed.
        rank: see :class:`EpochBatchSampler`.
        world_size: see :class:`EpochBatchSampler`.
        sample_seeds: see :class:`EpochBatchSampler`.
    """

    def __init__(
        self,
        pids: Sequence[int],
        camids: Sequence[int],
        batch_size: int,
        num_instances: int,
        seed: int,
        rank: int | None = None,
        world_size: int | None = None,
        sample_seeds: bool = False,
    ) -> None:
        if len(camids) != len(pids):
            raise ValueError(f"{len(pids)} pids but {len(camids)} camera ids")
        super().__init__(pids, batch_size, num_instances, seed, rank, world_size, sample_seeds)
        self.batch_size = self.num_identities * self.num_instances
        cams = np.asarray(camids, dtype=np.int64)
        self._cams_by_pid = [cams[idxs] for idxs in self._index_by_pid]

    def global_batches(self, rng: np.random.Generator) -> list[list[int]]:  # noqa: D102
        k = self.num_instances
        flat: list[int] = []
        for ident in rng.permutation(len(self.pids)).tolist():
            idxs, cams = self._index_by_pid[ident], self._cams_by_pid[ident]
            anchor = int(rng.integers(len(idxs)))
            flat.append(int(idxs[anchor]))
            pool = np.flatnonzero(cams != cams[anchor])
            if pool.size == 0:
                pool = np.flatnonzero(np.arange(len(idxs)) != anchor)
            if pool.size:
                picks = rng.choice(pool, size=k - 1, replace=bool(pool.size < k))
                flat += idxs[picks].tolist()
        b = self.batch_size
        usable = len(flat) - len(flat) % b
        return [flat[i : i + b] for i in range(0, usable, b)]


class ShuffleBatchSampler(EpochBatchSampler):
    """Shuffled batches of a fixed size (``DATALOADER.SAMPLER 'softmax'``).

    Args:
        num_samples: dataset length.
        batch_size: images per batch on this rank.
        seed: run seed.
        drop_last: drop the last incomplete batch (a BatchNorm layer cannot train on one image).
        rank: see :class:`EpochBatchSampler`.
        world_size: see :class:`EpochBatchSampler`.
        sample_seeds: see :class:`EpochBatchSampler`.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        seed: int,
        drop_last: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
        sample_seeds: bool = False,
    ) -> None:
        super().__init__(seed, rank, world_size, sample_seeds)
        if batch_size < 1 or num_samples < 1:
            raise ValueError(
                f"need num_samples >= 1 and batch_size >= 1, got {num_samples}, {batch_size}"
            )
        self.num_samples = int(num_samples)
        self.batch_size = int(batch_size)
        self.drop_last = drop_last

    def global_batches(self, rng: np.random.Generator) -> list[list[int]]:  # noqa: D102
        order = rng.permutation(self.num_samples).tolist()
        b = self.batch_size
        end = len(order) - len(order) % b if self.drop_last and len(order) >= b else len(order)
        return [order[i : i + b] for i in range(0, end, b)]


class FixedLengthBatchSampler(Sampler[list]):
    """A fixed number of batches per epoch, restarting the wrapped sampler when it runs out.

    PCL-CLIP (and ClusterContrast, whose ``IterLoader`` it uses) trains a fixed number of
    iterations per epoch (``SOLVER.ITERS`` 200 there): each epoch starts a new pass of the P x K
    sampler, and when a pass is exhausted before the count is reached the sampler starts over
    with a fresh shuffle; what is left of the last pass at the end of the epoch is dropped. Here
    pass ``k`` of an epoch is ``sampler.epoch_batches(k)``: a fresh draw that is a pure function
    of ``(seed, epoch, k)``, so a resumed run replays it. In a distributed run every rank takes
    its share of each pass and yields ``num_batches`` batches.

    Args:
        sampler: the epoch batch sampler to draw passes from.
        num_batches: batches per epoch (``DATALOADER.ITERS_PER_EPOCH``), >= 1.
    """

    def __init__(self, sampler: EpochBatchSampler, num_batches: int) -> None:
        if int(num_batches) < 1:
            raise ValueError(f"num_batches must be >= 1, got {num_batches}")
        self.sampler = sampler
        self.num_batches = int(num_batches)
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose batches the next iteration yields.

        Args:
            epoch: any integer (the training loop's epoch counter).
        """
        self.sampler.set_epoch(epoch)

    @property
    def epoch(self) -> int:
        """The current epoch of the wrapped sampler."""
        return self.sampler.epoch

    def skip_next(self, num_batches: int) -> None:
        """Make the next iteration start after its first ``num_batches`` batches (a resumed epoch).

        Args:
            num_batches: batches of the current epoch already trained on.
        """
        self._skip = int(num_batches)

    def __iter__(self) -> Iterator[list]:
        """Yield ``num_batches`` batches: pass 0, then fresh passes until the count is reached.

        Raises:
            RuntimeError: a pass yields no batch on this rank (the count could never be reached).
        """
        left, pass_index = self.num_batches, 0
        skip, self._skip = self._skip, 0
        while left > 0:
            batches = self.sampler.epoch_batches(pass_index)
            if not batches:
                raise RuntimeError(
                    "the batch sampler yields no batch on this process: not enough training "
                    "images or identities for one batch per process"
                )
            for batch in batches[:left]:
                if skip:
                    skip -= 1  # already trained on before the run was interrupted
                else:
                    yield list(batch)
            left -= min(left, len(batches))
            pass_index += 1

    def __len__(self) -> int:
        """``num_batches``, whatever the length of a pass."""
        return self.num_batches
