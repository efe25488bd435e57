"""RoIAlign in plain torch (polyfocus/model/objects.py; spec mg_llava.md §10): `roi_align` against a naive loop written
line by line from torchvision's CPU kernel (roi_align_kernel.cpp: aligned False/True, adaptive and fixed sampling
ratio, its border rules), and MG-LLaVA's fast path `roi_mean` (mean over the bins of RoIAlign on the upsampled,
concatenated multi-stage map, never built) against that map built for real. torchvision itself, where installed.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from polyfocus.model.objects import box_features, naive_box_features, roi_align, roi_mean, upsample_matrix


def bilinear_reference(feature, y, x):
    """torchvision's bilinear_interpolate (roi_align_common.h), scalar by scalar. feature [C, H, W]."""
    _, height, width = feature.shape
    if y < -1.0 or y > height or x < -1.0 or x > width:
        return torch.zeros(feature.shape[0], dtype=feature.dtype)
    y, x = max(y, 0.0), max(x, 0.0)
    y_low, x_low = int(y), int(x)
    if y_low >= height - 1:
        y_high = y_low = height - 1
        y = float(y_low)
    else:
        y_high = y_low + 1
    if x_low >= width - 1:
        x_high = x_low = width - 1
        x = float(x_low)
    else:
        x_high = x_low + 1
    ly, lx = y - y_low, x - x_low
    hy, hx = 1.0 - ly, 1.0 - lx
    return (hy * hx * feature[:, y_low, x_low] + hy * lx * feature[:, y_low, x_high]
            + ly * hx * feature[:, y_high, x_low] + ly * lx * feature[:, y_high, x_high])


def roi_align_reference(feature, box, output_size, spatial_scale, sampling_ratio, aligned):
    """roi_align_forward_kernel_impl for one box, loop by loop. feature [C, H, W]; box (x1, y1, x2, y2)."""
    ph_n, pw_n = output_size
    offset = 0.5 if aligned else 0.0
    x1, y1, x2, y2 = (float(v) for v in box)
    start_w, start_h = x1 * spatial_scale - offset, y1 * spatial_scale - offset
    end_w, end_h = x2 * spatial_scale - offset, y2 * spatial_scale - offset
    roi_w, roi_h = end_w - start_w, end_h - start_h
    if not aligned:
        roi_w, roi_h = max(roi_w, 1.0), max(roi_h, 1.0)
    bin_h, bin_w = roi_h / ph_n, roi_w / pw_n
    grid_h = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_h / ph_n)
    grid_w = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_w / pw_n)
    count = max(grid_h * grid_w, 1)
    out = torch.zeros(feature.shape[0], ph_n, pw_n, dtype=feature.dtype)
    for ph in range(ph_n):
        for pw in range(pw_n):
            acc = torch.zeros(feature.shape[0], dtype=feature.dtype)
            for iy in range(grid_h):
                y = start_h + ph * bin_h + (iy + 0.5) * bin_h / grid_h
                for ix in range(grid_w):
                    x = start_w + pw * bin_w + (ix + 0.5) * bin_w / grid_w
                    acc += bilinear_reference(feature, y, x)
            out[:, ph, pw] = acc / count
    return out


# Boxes meeting every rule: inside, across each border, far outside (zero contribution), smaller than a cell
# (legacy: forced to 1 cell; aligned: a zero grid), zero-size, inverted, ending exactly at the last cell.
BOXES = torch.tensor([
    [1.0, 2.0, 9.0, 7.0], [-3.0, -2.5, 4.0, 3.0], [10.0, 6.0, 16.0, 13.5], [20.0, 20.0, 30.0, 25.0],
    [3.2, 3.3, 3.6, 3.5], [5.0, 5.0, 5.0, 5.0], [7.0, 6.0, 2.0, 1.0], [0.0, 0.0, 14.0, 10.0], [-9.0, 1.0, -2.5, 4.0],
    [0.3, 0.7, 13.9, 9.6],
], dtype=torch.float64)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 2])
@pytest.mark.parametrize("output_size", [(2, 3), (1, 1)])
@pytest.mark.parametrize("spatial_scale", [1.0, 0.5])
def test_roi_align_matches_torchvisions_loop(aligned, sampling_ratio, output_size, spatial_scale):
    g = torch.Generator().manual_seed(0)
    features = torch.randn(2, 3, 5, 7, generator=g, dtype=torch.float64)  # H != W: rows and columns not swapped
    boxes = torch.cat([torch.tensor([[i % 2] for i in range(len(BOXES))], dtype=torch.float64), BOXES * 0.5 / spatial_scale], 1)
    out = roi_align(features, boxes, output_size, spatial_scale, sampling_ratio, aligned)
    want = torch.stack([roi_align_reference(features[int(b[0])], b[1:], output_size, spatial_scale, sampling_ratio,
                                            aligned) for b in boxes])
    assert out.shape == (len(boxes), 3, *output_size)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-12)


def test_roi_align_takes_a_list_of_boxes_per_image():
    g = torch.Generator().manual_seed(1)
    features = torch.randn(2, 4, 6, 6, generator=g)
    first, second = BOXES[:3].float(), BOXES[3:5].float()
    out = roi_align(features, [first, second], 3, 1.0)
    index = torch.tensor([[0.0]] * 3 + [[1.0]] * 2)
    torch.testing.assert_close(out, roi_align(features, torch.cat([index, torch.cat([first, second])], 1), 3, 1.0))


def test_hand_computed_values():
    """F[:, i, j] = i on a 4x4 map. Box (0, 0, 4, 4), 2x2 bins, 2x2 samples: rows sampled at 0.5, 1.5, 2.5, 3.5 and
    3.5 lies past the last cell (3), so it reads row 3: bins (0.5+1.5)/2 = 1 and (2.5+3)/2 = 2.75."""
    feature = torch.arange(4.0).view(1, 4, 1).expand(1, 4, 4)[None]
    out = roi_align(feature, [torch.tensor([[0.0, 0.0, 4.0, 4.0]])], 2, 1.0, 2, False)
    assert out[0, 0].tolist() == [[1.0, 1.0], [2.75, 2.75]]
    # aligned: the same box is shifted by half a cell: rows at 0, 1, 2, 3 → 0.5 and 2.5
    out = roi_align(feature, [torch.tensor([[0.0, 0.0, 4.0, 4.0]])], 2, 1.0, 2, True)
    assert out[0, 0].tolist() == [[0.5, 0.5], [2.5, 2.5]]
    # far outside (y < -1 for every sample): zero, not a border value
    assert not roi_align(feature + 5, [torch.tensor([[0.0, -9.0, 4.0, -4.0]])], 2, 1.0).any()


@pytest.mark.parametrize("out_size,in_size", [(16, 16), (16, 8), (16, 4), (12, 5), (7, 3), (5, 7)])
def test_upsample_matrix_is_torchs_bilinear_interpolate(out_size, in_size):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, in_size, in_size + 1, generator=g, dtype=torch.float64)
    want = F.interpolate(x[None], size=(out_size, out_size + 2), mode="bilinear", align_corners=False)[0]
    rows = upsample_matrix(out_size, in_size, torch.float64)
    cols = upsample_matrix(out_size + 2, in_size + 1, torch.float64)
    torch.testing.assert_close(rows @ x @ cols.T, want, rtol=0, atol=1e-12)


def stage_maps(channels=(3, 4, 5, 6), side=16, seed=3, dtype=torch.float64):
    """Four stages at strides 1, 2, 4, 8 of a `side` map (ConvNeXt's pattern)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(c, side >> s, side >> s, generator=g, dtype=dtype) for s, c in enumerate(channels)]


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 1, 3])
@pytest.mark.parametrize("output_size", [56, 7, 4])
def test_roi_mean_is_the_mean_of_roi_align_on_the_built_map(aligned, sampling_ratio, output_size):
    stages = stage_maps()
    # boxes in pixels of a 64 px image (spatial scale 16/64), within, across and outside the image, degenerate
    boxes = torch.cat([BOXES * 4, torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 64.0, 64.0], [60.0, 2.0, 75.0, 9.0]],
                                               dtype=torch.float64)])
    upsampled = [stages[0]] + [F.interpolate(s[None], size=(16, 16), mode="bilinear", align_corners=False)[0]
                               for s in stages[1:]]
    want = roi_align(torch.cat(upsampled)[None], [boxes], output_size, 16 / 64, sampling_ratio, aligned).mean((2, 3))
    got = roi_mean(stages, boxes, 16 / 64, output_size, sampling_ratio, aligned)
    assert got.dtype == torch.float32 and got.shape == (len(boxes), 18)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_box_features_batch_equals_the_naive_map_per_image():
    """Two images, boxes grouped by image as [K, 5]; also at ConvNeXt-L's channel split on a smaller map."""
    g = torch.Generator().manual_seed(4)
    stages = [torch.randn(2, c, 32 >> s, 32 >> s, generator=g) for s, c in enumerate((192, 384, 768, 1536))]
    boxes = torch.tensor([[0, 10.0, 20.0, 60.0, 90.0], [0, 0.0, 0.0, 0.0, 0.0], [1, 100.0, 3.0, 128.0, 40.0],
                          [1, -5.0, 60.0, 30.0, 140.0]])
    got = box_features(stages, boxes, image_size=128)
    want = torch.cat([naive_box_features([s[0] for s in stages], boxes[:2, 1:], 128),
                      naive_box_features([s[1] for s in stages], boxes[2:, 1:], 128)])
    assert got.shape == (4, 2880)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 2])
def test_reference_precision_is_mg_llavas_casts_around_roi_align(aligned, sampling_ratio):
    """box_pool_precision "reference": the upsampled stages rounded to the tower's dtype (bf16 here), RoIAlign's bins
    in fp32 on that map, rounded to the LLM's dtype before the mean: as MG-LLaVA does it, on the built map. It differs
    from the default (all fp32) in bf16 and agrees with it in fp32."""
    g = torch.Generator().manual_seed(6)
    stages = [torch.randn(2, c, 32 >> s, 32 >> s, generator=g).bfloat16() for s, c in enumerate((24, 48, 96, 192))]
    boxes = torch.tensor([[0, 10.0, 20.0, 60.0, 90.0], [0, 0.0, 0.0, 0.0, 0.0], [1, 100.0, 3.0, 128.0, 40.0],
                          [1, -5.0, 60.0, 30.0, 140.0], [1, 3.0, 3.0, 9.0, 6.0]])
    got = box_features(stages, boxes, 128, 8, sampling_ratio, aligned, precision="reference", bin_dtype=torch.bfloat16)
    casts = (torch.bfloat16, torch.bfloat16)
    want = torch.cat([naive_box_features([s[0] for s in stages], boxes[:2, 1:], 128, 8, sampling_ratio, aligned, casts),
                      naive_box_features([s[1] for s in stages], boxes[2:, 1:], 128, 8, sampling_ratio, aligned, casts)])
    assert got.dtype == torch.bfloat16 and got.shape == (5, 360)
    # the bins agree to fp32 rounding, so a rounded bin may land one bf16 step away, rarely
    assert (got == want).float().mean() > 0.99
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=2 ** -7 * want.float().abs().max().item())
    fp32 = box_features(stages, boxes, 128, 8, sampling_ratio, aligned)
    assert (fp32 - got.float()).abs().max() > 1e-3  # bf16: the casts matter
    full = [s.float() for s in stages]
    torch.testing.assert_close(box_features(full, boxes, 128, 8, sampling_ratio, aligned, precision="reference",
                                            bin_dtype=torch.float32),
                               box_features(full, boxes, 128, 8, sampling_ratio, aligned), rtol=1e-5, atol=1e-5)


def test_against_torchvision_where_installed():
    tv = pytest.importorskip("torchvision")
    g = torch.Generator().manual_seed(5)
    features = torch.randn(2, 3, 9, 11, generator=g, dtype=torch.float64)
    boxes = torch.cat([torch.tensor([[i % 2] for i in range(len(BOXES))], dtype=torch.float64), BOXES], 1)
    for aligned in (False, True):
        for ratio in (-1, 2):
            torch.testing.assert_close(roi_align(features, boxes, (3, 2), 0.7, ratio, aligned),
                                       tv.ops.roi_align(features, boxes, (3, 2), 0.7, ratio, aligned))
