"""P x K and shuffle batch samplers: invariants, determinism and distributed shares."""

from __future__ import annotations

import logging
from collections import Counter

import pytest

from datasets.build import build_train_sampler
from datasets.image_dataset import SampleKey
from datasets.samplers import (
    CameraAwareIdentityBatchSampler,
    FixedLengthBatchSampler,
    RandomIdentityBatchSampler,
    ShuffleBatchSampler,
)


def pid_list(counts: dict[int, int]) -> list[int]:
    """Dataset pids: identity p repeated counts[p] times, interleaved as in a sorted folder."""
    return [p for p, n in sorted(counts.items()) for _ in range(n)]


COUNTS = {3: 9, 5: 4, 8: 7, 11: 4, 12: 12, 20: 5, 21: 8, 30: 4}  # 53 images, 8 identities


def test_pk_batches_have_p_identities_of_k_images():
    pids = pid_list(COUNTS)
    sampler = RandomIdentityBatchSampler(pids, batch_size=12, num_instances=4, seed=1)
    for epoch in range(5):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler) > 0
        seen = Counter()
        for batch in batches:
            per_id = Counter(pids[i] for i in batch)
            assert len(batch) == 12 and len(per_id) == 3 and set(per_id.values()) == {4}
            seen.update(batch)
        # every identity here has >= K images: no index is drawn twice in an epoch
        assert max(seen.values()) == 1
        # each batch takes one K-chunk per identity; the epoch stops only when fewer than P
        # identities still have a full chunk
        used = Counter(p for b in batches for p in {pids[i] for i in b})
        left = {p: n // 4 - used[p] for p, n in COUNTS.items()}
        assert min(left.values()) >= 0
        assert sum(1 for v in left.values() if v > 0) < 3


def test_pk_coverage_over_an_epoch():
    # 6 identities x 8 images, P = 2, K = 4: every chunk is used, so every index appears once.
    pids = pid_list({p: 8 for p in range(6)})
    sampler = RandomIdentityBatchSampler(pids, batch_size=8, num_instances=4, seed=3)
    flat = [i for b in sampler for i in b]
    assert sorted(flat) == list(range(48))
    assert len(sampler) == 6 * 2 // 2


def test_pk_identity_with_fewer_than_k_images_drawn_with_replacement():
    pids = [0, 0, 1, 1, 1, 1, 2, 2, 2, 2]  # identity 0 has 2 < K = 4 images
    sampler = RandomIdentityBatchSampler(pids, batch_size=8, num_instances=4, seed=0)
    uses_zero = 0
    for epoch in range(20):
        sampler.set_epoch(epoch)
        for batch in sampler:
            per_id = Counter(pids[i] for i in batch)
            assert set(per_id.values()) == {4}
            if 0 in per_id:
                uses_zero += 1
                assert {i for i in batch if pids[i] == 0} <= {0, 1}
    assert uses_zero > 0


def test_pk_fewer_identities_than_p_still_yields_batches(caplog):
    pids = pid_list({7: 8, 9: 8})  # 2 identities, P = 16 // 4 = 4
    with caplog.at_level(logging.WARNING, logger="datasets"):
        sampler = RandomIdentityBatchSampler(pids, batch_size=16, num_instances=4, seed=0)
    assert "only 2 training identities, fewer than P" in caplog.text
    batches = list(sampler)
    assert len(batches) == 2  # 2 chunks per identity, both identities in each batch
    for batch in batches:
        assert sorted(Counter(pids[i] for i in batch).values()) == [4, 4]


def test_same_seed_and_epoch_same_batches():
    pids = pid_list(COUNTS)
    a = RandomIdentityBatchSampler(pids, 8, 4, seed=5)
    b = RandomIdentityBatchSampler(pids, 8, 4, seed=5)
    a.set_epoch(3)
    b.set_epoch(3)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(4)
    assert list(a) != first
    a.set_epoch(3)
    assert list(a) == first  # a resumed run replays epoch 3
    c = RandomIdentityBatchSampler(pids, 8, 4, seed=6)
    c.set_epoch(3)
    assert list(c) != first


def test_sample_seeds_wrap_the_same_indices():
    pids = pid_list(COUNTS)
    plain = RandomIdentityBatchSampler(pids, 8, 4, seed=2)
    seeded = RandomIdentityBatchSampler(pids, 8, 4, seed=2, sample_seeds=True)
    batches = list(seeded)
    assert all(isinstance(k, SampleKey) for b in batches for k in b)
    assert [[k.index for k in b] for b in batches] == list(plain)
    seeds = [k.seed for b in batches for k in b]
    assert len(set(seeds)) == len(seeds)


@pytest.mark.parametrize("world_size", [2, 3])
def test_distributed_shares_are_disjoint_slices_of_one_permutation(world_size):
    pids = pid_list(COUNTS)
    single = RandomIdentityBatchSampler(pids, 8, 4, seed=9, rank=0, world_size=1)
    single.set_epoch(2)
    reference = list(single)
    shares = []
    for rank in range(world_size):
        s = RandomIdentityBatchSampler(pids, 8, 4, seed=9, rank=rank, world_size=world_size)
        s.set_epoch(2)
        shares.append(list(s))
    usable = len(reference) - len(reference) % world_size
    assert all(len(sh) == usable // world_size for sh in shares)
    for rank, share in enumerate(shares):
        assert share == reference[rank:usable:world_size]
    positions = [tuple(b) for sh in shares for b in sh]
    assert sorted(positions) == sorted(tuple(b) for b in reference[:usable])


def test_shuffle_sampler_covers_the_dataset_and_shards():
    s = ShuffleBatchSampler(23, batch_size=5, seed=0, drop_last=True)
    batches = list(s)
    assert len(batches) == len(s) == 4 and all(len(b) == 5 for b in batches)
    assert len({i for b in batches for i in b}) == 20
    keep = ShuffleBatchSampler(23, batch_size=5, seed=0, drop_last=False)
    assert sorted(i for b in keep for i in b) == list(range(23))
    shares = [list(ShuffleBatchSampler(23, 5, 0, True, rank=r, world_size=2)) for r in range(2)]
    assert shares[0] + shares[1] == batches[0:4:2] + batches[1:4:2]


def test_build_train_sampler_splits_the_global_batch():
    pids = pid_list(COUNTS)
    s = build_train_sampler(pids, "softmax_triplet", 16, 4, seed=0, rank=1, world_size=2)
    assert isinstance(s, RandomIdentityBatchSampler) and s.num_identities == 2
    assert all(len(b) == 8 for b in s)
    with pytest.raises(ValueError, match="NUM_INSTANCE"):
        build_train_sampler(pids, "softmax_triplet", 12, 4, seed=0, rank=0, world_size=2)
    with pytest.raises(ValueError, match="valid: 'softmax_triplet', 'softmax'"):
        build_train_sampler(pids, "triplet", 16, 4, seed=0, rank=0, world_size=1)


# ------------------------------------------------------------------------------------------------
# Fixed number of batches per epoch (DATALOADER.ITERS_PER_EPOCH, PCL-CLIP's 200 iterations)
# ------------------------------------------------------------------------------------------------
def _is_pk_pass(batches, pids):
    """Each batch is 2 identities x 4 images and no index is drawn twice."""
    for batch in batches:
        assert sorted(Counter(pids[i] for i in batch).values()) == [4, 4]
    flat = [i for b in batches for i in b]
    return len(flat) == len(set(flat)) and len(batches) >= 5


def test_fixed_length_restarts_the_sampler_with_fresh_passes():
    # 6 identities x 8 images, P = 2, K = 4: a pass is 5 or 6 batches (6 when no identity is
    # left alone with a chunk), no index twice.
    pids = pid_list({p: 8 for p in range(6)})
    inner = RandomIdentityBatchSampler(pids, batch_size=8, num_instances=4, seed=3)
    fixed = FixedLengthBatchSampler(inner, 15)
    fixed.set_epoch(2)
    assert inner.epoch == fixed.epoch == 2
    batches = list(fixed)
    assert len(fixed) == len(batches) == 15
    # Pass 0 is the plain sampler's epoch; then complete, freshly shuffled P x K passes; the
    # epoch ends inside the last pass (the rest of that pass is dropped).
    plain = RandomIdentityBatchSampler(pids, batch_size=8, num_instances=4, seed=3)
    plain.set_epoch(2)
    passes = [inner.epoch_batches(k) for k in range(3)]
    assert passes[0] == list(plain)
    assert all(_is_pk_pass(p, pids) for p in passes)
    assert passes[1] != passes[0] and passes[2] != passes[1]
    n0, n1 = len(passes[0]), len(passes[1])
    assert n0 + n1 < 15 <= n0 + n1 + len(passes[2])
    assert batches == (passes[0] + passes[1] + passes[2])[:15]
    # Every pass is a function of (seed, epoch, pass): the same epoch replays (resume), another
    # epoch differs.
    assert list(fixed) == batches
    fixed.set_epoch(3)
    assert list(fixed)[:n0] != passes[0]
    fixed.set_epoch(2)
    assert list(fixed) == batches
    # Shorter than one pass: a prefix of the pass.
    short = FixedLengthBatchSampler(plain, 4)
    assert len(short) == 4 and list(short) == passes[0][:4]
    with pytest.raises(ValueError, match="num_batches"):
        FixedLengthBatchSampler(plain, 0)


def test_fixed_length_fresh_passes_get_fresh_augmentation_seeds():
    pids = pid_list({p: 8 for p in range(6)})
    inner = RandomIdentityBatchSampler(pids, 8, 4, seed=1, sample_seeds=True)
    fixed = FixedLengthBatchSampler(inner, 12)
    keys = [k for b in fixed for k in b]
    n0 = len(inner.epoch_batches(0))
    first, later = keys[: 8 * n0], keys[8 * n0 :]
    # A restarted pass draws indices again, each with a new augmentation seed.
    assert {k.index for k in first} & {k.index for k in later}
    assert len({k.seed for k in keys}) == len(keys) == 96


@pytest.mark.parametrize("world_size", [2, 3])
def test_fixed_length_distributed_shares(world_size):
    pids = pid_list(COUNTS)
    shares = []
    for rank in range(world_size):
        inner = RandomIdentityBatchSampler(pids, 8, 4, seed=9, rank=rank, world_size=world_size)
        fixed = FixedLengthBatchSampler(inner, 7)
        fixed.set_epoch(1)
        shares.append(list(fixed))
        # Each rank: its share of pass 0, then of pass 1, ..., 7 batches in all.
        expected = [b for k in range(10) for b in inner.epoch_batches(k)][:7]
        assert shares[-1] == expected and len(fixed) == 7
    single = RandomIdentityBatchSampler(pids, 8, 4, seed=9)
    single.set_epoch(1)
    usable = len(list(single)) - len(list(single)) % world_size
    assert [s[0] for s in shares] == list(single)[:world_size] and usable >= world_size


def test_fixed_length_with_no_batch_on_a_rank_fails_clearly():
    # One batch in all, two processes: no rank gets a batch.
    sampler = ShuffleBatchSampler(4, batch_size=4, seed=0, rank=0, world_size=2)
    with pytest.raises(RuntimeError, match="no batch"):
        list(FixedLengthBatchSampler(sampler, 2))


def test_build_train_sampler_iters_per_epoch():
    pids = pid_list(COUNTS)
    s = build_train_sampler(pids, "softmax_triplet", 8, 4, seed=0, rank=0, world_size=1)
    fixed = build_train_sampler(pids, "softmax", 8, 4, seed=0, world_size=1, iters_per_epoch=9)
    assert isinstance(fixed, FixedLengthBatchSampler) and len(fixed) == 9
    assert isinstance(fixed.sampler, ShuffleBatchSampler)
    pk = build_train_sampler(pids, "softmax_triplet", 8, 4, seed=0, world_size=1, iters_per_epoch=2)
    assert list(pk) == list(s)[:2]
    with pytest.raises(ValueError, match="ITERS_PER_EPOCH"):
        build_train_sampler(pids, "softmax", 8, 4, seed=0, world_size=1, iters_per_epoch=-1)


# ------------------------------------------------------------------------------------------------
# Camera-aware P x K (DATALOADER.CAMERA_AWARE, ClusterContrast's RandomMultipleGallerySampler)
# ------------------------------------------------------------------------------------------------
def _groups(flat, pids, k):
    """Split a pass into consecutive runs of one identity (the sampler emits one run per id)."""
    runs, start = [], 0
    for i in range(1, len(flat) + 1):
        if i == len(flat) or pids[flat[i]] != pids[flat[start]] or i - start == k:
            runs.append(flat[start:i])
            start = i
    return runs


def test_camera_aware_pk_takes_companions_from_other_cameras():
    # id 0: cameras 0,0,0,1,1,2 (6 images); id 1: one camera (5 images); id 2: one image;
    # id 3: cameras 0,1,1,1,1 (5 images); ids 4-7: 4 images on 2 cameras.
    spec = {0: [0, 0, 0, 1, 1, 2], 1: [3] * 5, 2: [1], 3: [0, 1, 1, 1, 1]}
    spec.update({p: [0, 1, 0, 1] for p in range(4, 8)})
    pids = [p for p, cams in spec.items() for _ in cams]
    camids = [c for cams in spec.values() for c in cams]
    k, batch = 3, 6
    sampler = CameraAwareIdentityBatchSampler(pids, camids, batch, k, seed=0)
    total = 7 * k + 1  # every identity once per pass; id 2 gives its anchor alone
    for epoch in range(30):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == total // batch and all(len(b) == batch for b in batches)
        flat = [i for b in batches for i in b]
        runs = _groups(flat, pids, k)
        seen = [pids[r[0]] for r in runs]
        assert len(seen) == len(set(seen))  # no identity twice in a pass
        for run in runs:
            pid = pids[run[0]]
            anchor, rest = run[0], run[1:]
            if pid == 2:
                assert rest == []
                continue
            if len(run) < k:  # the pass was cut at the last full batch
                continue
            if len(set(spec[pid])) > 1:
                # Companions come from other cameras than the anchor's.
                assert all(camids[i] != camids[anchor] for i in rest)
            else:
                assert anchor not in rest
            others = sum(c != camids[anchor] for c in spec[pid]) or len(spec[pid]) - 1
            if others >= k:  # enough: drawn without replacement
                assert len(set(rest)) == len(rest)
    sampler.set_epoch(3)
    first = list(sampler)
    again = CameraAwareIdentityBatchSampler(pids, camids, batch, k, seed=0)
    again.set_epoch(3)
    assert list(again) == first  # a function of (seed, epoch)


def test_camera_aware_pk_replacement_rule_of_the_original():
    # 1 anchor camera image + K - 1 = 3 other-camera images: fewer than K, so ClusterContrast
    # draws them WITH replacement (duplicates happen); with K = 4 others, never.
    def duplicates(cams):
        sampler = CameraAwareIdentityBatchSampler([0] * len(cams), cams, 4, 4, seed=1)
        count = 0
        for epoch in range(200):
            sampler.set_epoch(epoch)
            (batch,) = list(sampler)
            others = sum(c != cams[batch[0]] for c in cams)
            if others == 3:
                count += len(set(batch[1:])) < 3
            elif others >= 4:
                assert len(set(batch[1:])) == 3
        return count

    # The cam-0 anchor (1/4 of 200 epochs) has 3 others; 3 draws from 3 with replacement repeat
    # one with probability 1 - 3! / 27 = 0.78: about 39 epochs.
    assert 20 < duplicates([0, 1, 1, 1]) < 60
    assert duplicates([0] * 4 + [1] * 4) == 0  # always 4 others


def test_build_train_sampler_camera_aware():
    pids = pid_list(COUNTS)
    camids = [i % 3 for i in range(len(pids))]
    s = build_train_sampler(
        pids, "softmax_triplet", 8, 4, seed=0, world_size=1, camids=camids, camera_aware=True
    )
    assert isinstance(s, CameraAwareIdentityBatchSampler) and len(list(s)) == 8 * 4 // 8
    with pytest.raises(ValueError, match="CAMERA_AWARE"):
        build_train_sampler(
            pids, "softmax", 8, 4, 0, world_size=1, camids=camids, camera_aware=True
        )


def test_camera_aware_pk_fewer_identities_than_p_still_yields_batches(caplog):
    pids, camids = [0] * 4 + [1] * 4, [0, 1] * 4
    with caplog.at_level(logging.WARNING, logger="datasets"):
        sampler = CameraAwareIdentityBatchSampler(pids, camids, 16, 4, seed=0)
    assert "only 2 training identities" in caplog.text and sampler.batch_size == 8
    (batch,) = list(sampler)
    assert sorted(Counter(pids[i] for i in batch).values()) == [4, 4]
