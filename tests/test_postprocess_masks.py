"""`binary_masks` (each instance's box only, both resizes as one matrix per axis) gives the masks
of the plain recipe, `upsample_masks` (two F.interpolate calls over the whole image) > threshold:
per instance mask IoU >= 0.99 and almost every pixel equal, over the letterbox geometries
prediction meets (no resize, upscaled photo, downscaled photo, odd sizes), on mask-like
probability maps and on noise, with the edge cases: no instance, an instance with no pixel above
the threshold, one touching the borders, one covering the whole map."""
from __future__ import annotations

import pytest
import torch

from mobileinst.models.postprocess import binary_masks, upsample_masks

THRESHOLD = 0.45  # InferenceConfig.mask_threshold


def blobs(k: int, h4: int, w4: int, seed: int = 0) -> torch.Tensor:
    """(k, h4, w4) probabilities of noisy ellipses of many sizes, some cut by the borders."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(h4).float(), torch.arange(w4).float(), indexing="ij")
    out = []
    for _ in range(k):
        cy, cx = (torch.rand(2, generator=g) * torch.tensor([h4 * 1.2, w4 * 1.2])
                  - 0.1 * torch.tensor([h4, w4])).tolist()
        ry, rx = (1 + torch.rand(2, generator=g) * torch.tensor([h4 / 3, w4 / 3])).tolist()
        d = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
        out.append(torch.sigmoid(4 * (1 - d) + 0.7 * torch.randn(h4, w4, generator=g)))
    return torch.stack(out)


def assert_equal_masks(got: torch.Tensor, ref: torch.Tensor) -> None:
    assert got.dtype == torch.bool and got.shape == ref.shape
    inter = (got & ref).flatten(1).sum(1)
    union = (got | ref).flatten(1).sum(1)
    iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones(len(ref)))
    assert bool((iou >= 0.99).all()), iou.min()
    assert (got != ref).float().mean() <= 1e-4  # only pixels within rounding of the threshold


GEOMETRIES = [  # padded input, resized image inside it, original image
    ((640, 640), (480, 640), (480, 640)),  # letterboxed, not resized
    ((640, 640), (480, 640), (1080, 1440)),  # a photo shrunk to fit
    ((640, 640), (640, 427), (300, 200)),  # a small photo enlarged
    ((256, 352), (256, 341), (300, 400)),
    ((96, 64), (77, 35), (25, 17)),  # odd sizes, strong downscale
    ((64, 96), (60, 90), (500, 641)),  # strong upscale
]


@pytest.mark.parametrize("padded,size,orig", GEOMETRIES)
@pytest.mark.parametrize("kind", ["blobs", "noise"])
def test_binary_masks_equal_the_plain_recipe(padded, size, orig, kind):
    h4, w4 = padded[0] // 4, padded[1] // 4
    prob = blobs(12, h4, w4) if kind == "blobs" else torch.rand(5, h4, w4, generator=torch.Generator().manual_seed(1))
    ref = upsample_masks(prob, padded, size, orig) > THRESHOLD
    assert ref.flatten(1).any(1).sum() >= 3, "the case has masks to compare"
    assert_equal_masks(binary_masks(prob, padded, size, orig, THRESHOLD), ref)


def test_edge_cases():
    padded, size, orig = (128, 160), (120, 160), (300, 400)
    prob = torch.zeros(4, 32, 40)
    prob[1] = 1.0  # the whole map
    prob[2, 0, 0] = prob[2, -1, -1] = 0.9  # two corner pixels: boxes at the borders
    prob[3, 10:14, 39] = 0.8  # the right edge only; prob[0] has nothing above the threshold
    got = binary_masks(prob, padded, size, orig, THRESHOLD)
    assert_equal_masks(got, upsample_masks(prob, padded, size, orig) > THRESHOLD)
    assert not got[0].any() and got[1].all() and got[2, 0, 0] and got[3].any()
    empty = binary_masks(prob[:0], padded, size, orig, THRESHOLD)
    assert empty.shape == (0, 300, 400) and empty.dtype == torch.bool
    plain = upsample_masks(prob[:0], padded, size, orig)  # no instance kept: an empty result
    assert plain.shape == (0, 300, 400) and plain.dtype == prob.dtype


@pytest.mark.parametrize("padded,size,orig", [GEOMETRIES[1], GEOMETRIES[3], GEOMETRIES[5]])
def test_a_box_in_bands_of_rows_is_the_box_in_one_piece(monkeypatch, padded, size, orig):
    import mobileinst.models.postprocess as pp

    prob = blobs(8, padded[0] // 4, padded[1] // 4, seed=2)
    whole = binary_masks(prob, padded, size, orig, THRESHOLD)
    for band_bytes in (1, 4 * 7 * orig[1], 4 * 100 * orig[1]):  # one row, 7 rows, 100 rows per band
        monkeypatch.setattr(pp, "BOX_BAND_BYTES", band_bytes)
        assert_equal_masks(binary_masks(prob, padded, size, orig, THRESHOLD), whole)


def test_no_band_holds_more_than_the_cap(monkeypatch):
    import mobileinst.models.postprocess as pp

    monkeypatch.setattr(pp, "BOX_BAND_BYTES", 4 * 64 * 400)  # 64 rows of the 400-wide photo
    biggest = []
    real_gt = torch.Tensor.__gt__

    def spy(self, other):
        if self.dtype == torch.float32 and self.dim() == 2:
            biggest.append(self.numel() * 4)
        return real_gt(self, other)

    monkeypatch.setattr(torch.Tensor, "__gt__", spy)
    prob = torch.ones(1, 32, 40)  # one mask over the whole photo
    got = binary_masks(prob, (128, 160), (120, 160), (300, 400), THRESHOLD)
    monkeypatch.undo()
    assert got.all() and biggest and max(biggest) <= 4 * 64 * 400
