"""The training sampler: reproducible, split over workers, resumable, aspect-ratio grouped."""
from __future__ import annotations

import pytest

from mobileinst.train.data import aspect_groups
from mobileinst.train.sampler import ResumableSampler


def batches(sampler: ResumableSampler, epoch: int = 0, start: int = 0) -> list[list[int]]:
    sampler.set_epoch(epoch, start)
    keys = [index for index, _ in sampler]
    return [keys[i : i + sampler.batch] for i in range(0, len(keys), sampler.batch)]


GROUPS = [0, 1, 1, 0, 0, 1, 0, 0, 1, 1, 0, 0, 0, 1, 0, 1, 0, 0, 1, 0, 1, 1, 0]  # 23 images


@pytest.mark.parametrize("world", [1, 2])
def test_grouped_batches_hold_one_orientation_on_every_worker(world):
    per_rank = [batches(ResumableSampler(len(GROUPS), 3, seed=5, rank=r, world=world, groups=GROUPS))
                for r in range(world)]
    assert all(len(b) == 23 // (3 * world) for b in per_rank)
    for step in zip(*per_rank):  # the workers' batches at one step form one global batch
        assert len({GROUPS[i] for b in step for i in b}) == 1, step


def test_grouping_is_reproducible_and_resumes_mid_epoch():
    make = lambda: ResumableSampler(len(GROUPS), 2, seed=1, groups=GROUPS)  # noqa: E731
    full = batches(make(), epoch=3)
    assert full == batches(make(), epoch=3)
    assert batches(make(), epoch=3, start=4) == full[4:]
    assert batches(make(), epoch=4) != full  # a new epoch, a new order


def test_grouped_epochs_cover_the_set_and_ungrouped_order_is_a_permutation():
    grouped = [i for b in batches(ResumableSampler(len(GROUPS), 2, seed=0, groups=GROUPS)) for i in b]
    assert len(grouped) == 22 and len(set(grouped)) >= 20  # remainders may repeat a few images
    plain = [i for b in batches(ResumableSampler(len(GROUPS), 2, seed=0)) for i in b]
    assert len(set(plain)) == len(plain) == 22


def test_tiny_mixed_set_still_fills_a_batch():
    sampler = ResumableSampler(3, 4, groups=[0, 1, 0])
    (batch,) = batches(sampler)
    assert len(batch) == 4 and set(batch) == {0, 2}  # the landscape images, repeated


def test_group_ids_must_match_the_set():
    with pytest.raises(ValueError, match="2 group ids for 3 samples"):
        ResumableSampler(3, 1, groups=[0, 1])


def test_aspect_groups_follow_detectron2():
    images = [{"height": 480, "width": 640}, {"height": 640, "width": 480}, {"height": 500, "width": 500}]
    assert aspect_groups(images) == [0, 1, 0]  # portrait = height > width; square goes with landscape
