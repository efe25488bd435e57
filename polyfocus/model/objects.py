"""MG-LLaVA's object-level tokens (Zhao et al. 2024, arXiv 2406.17770; spec mg_llava.md §5, §10): one LLM token per
object box, pooled from the high-resolution ConvNeXt's multi-stage feature map.

    stages  s_0..s_3 = ConvNeXt(768 px image)          [C_s, 192 / 2^s, 192 / 2^s]   (ConvNeXt-L: 192 ... 1536 ch)
    map     M = cat(s_0, up(s_1), up(s_2), up(s_3))    [2880, 192, 192]   up: bilinear, align_corners=False
    pooled  v_n = mean of RoIAlign(M, box_n)           [2880]   56 x 56 bins, spatial_scale 192/768, sampling -1,
                                                                 aligned=False (torchvision's defaults)
    token   t_n = MLP(v_n)                             [D]      the model's `mm_object_projector`

`roi_align` is torchvision's RoIAlign in plain torch (same semantics, no torchvision). The model never builds M:
the bins are averaged right away, and bilinear sampling and upsampling are both separable, so
v_n = sum_ij a_n[i] b_n[j] M[:, i, j] for one row-weight and one column-weight vector per box, and through the
upsampling matrices that is sum_pq (a_n U_s)[p] (b_n V_s)[q] s_s[:, p, q] per stage (`roi_mean`): exact up to float
rounding, without the 2880 x 192 x 192 map (425 MB per image in fp32) or the RoIAlign output (2880 x 56 x 56 per box).

Precision (config.box_pool_precision). "fp32", the default: the upsampling, the bins and their mean in fp32, whatever
the model's dtype. "reference": MG-LLaVA's own casts, which matter only in bf16/fp16: its open_clip encoder upsamples
each stage in fp32 and casts it back to the tower's dtype before the concatenation (the map holds bf16 values), and
its `align_box` runs RoIAlign in fp32 on that map, then casts the 56 x 56 bins to the LLM's dtype before the mean
(`roi_mean_reference`: one upsampled stage and one box's bins at a time; slower, for checkpoints trained that way).
bench/box_pool_precision.py measures the difference in bf16 (docs/mg_llava.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from polyfocus.config import BOX_POOL_PRECISIONS


def _axis_samples(start: torch.Tensor, length: torch.Tensor, bins: int, sampling_ratio: int):
    """Sample coordinates along one axis of every box, as torchvision places them.

    start, length: [N] (box start and extent in feature-map units) → coords [N, S], used [N, S] (S = bins * the
    largest grid; box n uses its first bins * g_n), g [N]: samples per bin (sampling_ratio, or ceil(length / bins))."""
    if sampling_ratio > 0:
        grid = torch.full_like(start, sampling_ratio, dtype=torch.long)
    else:
        grid = torch.ceil(length / bins).long()
    steps = bins * int(grid.max().clamp(min=1))
    k = torch.arange(steps, device=start.device)[None]  # [1, S]
    g = grid[:, None].clamp(min=1)
    bin_size = (length / bins)[:, None]
    # y = start + ph * bin + (iy + 0.5) * bin / grid, with sample k = ph * grid + iy (torchvision's order of operations)
    coords = start[:, None] + (k // g) * bin_size + ((k % g) + 0.5) * bin_size / g
    return coords, k < bins * grid[:, None], grid


def _bilinear_taps(coords: torch.Tensor, size: int):
    """torchvision's bilinear rule along one axis, for value F[i] at coordinate i: (low, high, w_low, w_high), each
    like `coords`. Samples outside [-1, size] get weight 0 (they still count in the bin's mean); the others are
    clamped at 0, and at the last cell both taps point at it."""
    inside = (coords >= -1.0) & (coords <= size)
    c = coords.clamp(min=0)
    low = c.floor().long()
    at_end = low >= size - 1
    low = low.clamp(max=size - 1)
    high = torch.where(at_end, low, low + 1)
    c = torch.where(at_end, low.to(c.dtype), c)
    frac = c - low
    return low, high, (1 - frac) * inside, frac * inside


def _indexed_boxes(boxes, n_images: int) -> torch.Tensor:
    """[K, 5] (image index, x1, y1, x2, y2), or a list of n_images [K_i, 4] → [K, 5]."""
    if isinstance(boxes, (list, tuple)):
        if len(boxes) != n_images:
            raise ValueError(f"{len(boxes)} box tensors for {n_images} images")
        return torch.cat([torch.cat([b.new_full((len(b), 1), i), b], 1) for i, b in enumerate(boxes)])
    if boxes.dim() != 2 or boxes.shape[1] != 5:
        raise ValueError(f"boxes must be [K, 5] (image index, x1, y1, x2, y2) or a list of [K_i, 4], got "
                         f"{tuple(boxes.shape)}")
    return boxes


def _box_axes(boxes: torch.Tensor, spatial_scale: float, aligned: bool):
    """[N, 4] boxes in input pixels → start and extent along y and x, in feature-map units (torchvision's rule)."""
    offset = 0.5 if aligned else 0.0
    x1, y1, x2, y2 = (boxes[:, i] * spatial_scale - offset for i in range(4))
    width, height = x2 - x1, y2 - y1
    if not aligned:  # the legacy rule: a box covers at least one feature cell
        width, height = width.clamp(min=1.0), height.clamp(min=1.0)
    return (y1, height), (x1, width)


def roi_align(input: torch.Tensor, boxes, output_size: int | tuple[int, int], spatial_scale: float = 1.0,
              sampling_ratio: int = -1, aligned: bool = False) -> torch.Tensor:
    """`torchvision.ops.roi_align` in plain torch, same arguments and semantics.

    input [B, C, H, W]; boxes [K, 5] (image index, x1, y1, x2, y2) or a list of B tensors [K_i, 4], in input-image
    pixels; → [K, C, PH, PW]. One box at a time (the sample grid differs per box); it builds a [C, PH*gh, W]
    intermediate per box, so it is the reference path, not the fast one (`roi_mean` is, for mean-pooled boxes)."""
    ph, pw = (output_size, output_size) if isinstance(output_size, int) else output_size
    _, channels, height, width = input.shape
    boxes = _indexed_boxes(boxes, input.shape[0]).to(input.dtype)
    (ys, rh), (xs, rw) = _box_axes(boxes[:, 1:], spatial_scale, aligned)
    y, _, gh = _axis_samples(ys, rh, ph, sampling_ratio)
    x, _, gw = _axis_samples(xs, rw, pw, sampling_ratio)
    y0, y1, wy0, wy1 = _bilinear_taps(y, height)
    x0, x1, wx0, wx1 = _bilinear_taps(x, width)
    out = input.new_zeros(len(boxes), channels, ph, pw)
    for n, image in enumerate(boxes[:, 0].long().tolist()):
        sy, sx = ph * int(gh[n]), pw * int(gw[n])
        if sy <= 0 or sx <= 0:  # an empty or inverted aligned box: torchvision's bins average no sample → 0
            continue
        feature = input[image]  # [C, H, W]
        rows = feature[:, y0[n, :sy]] * wy0[n, :sy, None] + feature[:, y1[n, :sy]] * wy1[n, :sy, None]  # [C, sy, W]
        grid = rows[:, :, x0[n, :sx]] * wx0[n, :sx] + rows[:, :, x1[n, :sx]] * wx1[n, :sx]  # [C, sy, sx]
        out[n] = grid.view(channels, ph, sy // ph, pw, sx // pw).mean((2, 4))
    return out


def _mean_weights(start: torch.Tensor, length: torch.Tensor, size: int, bins: int, sampling_ratio: int):
    """[N, size]: the weight of each feature row (or column) in the mean over a box's bins (all its bilinear samples
    along this axis, each bin's samples averaged, then the bins averaged)."""
    coords, used, grid = _axis_samples(start, length, bins, sampling_ratio)
    low, high, w_low, w_high = _bilinear_taps(coords, size)
    count = (bins * grid).clamp(min=1)[:, None].to(coords.dtype)
    weights = coords.new_zeros(len(start), size)
    weights.scatter_add_(1, low, w_low * used / count)
    return weights.scatter_add_(1, high, w_high * used / count)


def _bin_weights(start: torch.Tensor, length: torch.Tensor, size: int, bins: int, sampling_ratio: int):
    """[N, bins, size]: the weight of each feature row (or column) in each of a box's bins along this axis (the bin's
    bilinear samples averaged); `_mean_weights` is their mean over the bins."""
    coords, used, grid = _axis_samples(start, length, bins, sampling_ratio)
    low, high, w_low, w_high = _bilinear_taps(coords, size)
    g = grid.clamp(min=1)[:, None]
    k = torch.arange(coords.shape[1], device=coords.device)[None]
    row = (k // g).clamp(max=bins - 1) * size  # the sample's bin, as an offset into [bins * size]
    scale = used / g.to(coords.dtype)
    weights = coords.new_zeros(len(start), bins * size)
    weights.scatter_add_(1, row + low, w_low * scale)
    return weights.scatter_add_(1, row + high, w_high * scale).view(len(start), bins, size)


def upsample_matrix(out_size: int, in_size: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """[out, in]: `F.interpolate(mode="bilinear", align_corners=False)` along one axis as a matrix (identity when the
    sizes match): source = (dst + 0.5) * in / out - 0.5, clamped at 0; taps floor(source) and the next (or the same,
    at the last row)."""
    src = ((torch.arange(out_size, dtype=torch.float64) + 0.5) * (in_size / out_size) - 0.5).clamp(min=0)
    low = src.floor().long().clamp(max=in_size - 1)
    high = (low + 1).clamp(max=in_size - 1)
    frac = src - low
    matrix = torch.zeros(out_size, in_size, dtype=torch.float64)
    rows = torch.arange(out_size)
    matrix.index_put_((rows, low), 1 - frac, accumulate=True)
    matrix.index_put_((rows, high), frac, accumulate=True)
    return matrix.to(dtype=dtype, device=device)


def roi_mean(stages: list[torch.Tensor], boxes: torch.Tensor, spatial_scale: float, output_size: int = 56,
             sampling_ratio: int = -1, aligned: bool = False) -> torch.Tensor:
    """The mean over the output bins of `roi_align(cat(stages upsampled to stages[0]'s size), boxes)`, without
    building either: per stage, the box's separable row and column weights pulled back through the upsampling.

    stages: the feature maps of ONE image, [C_s, h_s, w_s] each (the first sets the map size); boxes: [N, 4] in
    input pixels; → [N, sum C_s] in float32 (the reference upsamples and pools in fp32)."""
    height, width = stages[0].shape[-2:]
    boxes = boxes.to(device=stages[0].device, dtype=torch.float32)
    (ys, rh), (xs, rw) = _box_axes(boxes, spatial_scale, aligned)
    rows = _mean_weights(ys, rh, height, output_size, sampling_ratio)  # [N, H]
    cols = _mean_weights(xs, rw, width, output_size, sampling_ratio)   # [N, W]
    pooled = []
    for stage in stages:
        channels, h, w = stage.shape
        a = rows @ upsample_matrix(height, h, device=rows.device)  # [N, h]
        b = cols @ upsample_matrix(width, w, device=cols.device)   # [N, w]
        t = (stage.float().reshape(channels * h, w) @ b.T).view(channels, h, len(boxes))  # [C, h, N]
        pooled.append(torch.einsum("chn,nh->nc", t, a))
    return torch.cat(pooled, dim=1)


def roi_mean_reference(stages: list[torch.Tensor], boxes: torch.Tensor, spatial_scale: float, output_size: int = 56,
                       sampling_ratio: int = -1, aligned: bool = False,
                       bin_dtype: torch.dtype | None = None) -> torch.Tensor:
    """`roi_mean` with MG-LLaVA's casts: the stages after the first upsampled in fp32 and rounded to the stages' dtype
    (the tower's: the reference's map), RoIAlign's bins computed in fp32 on that map, rounded to `bin_dtype` (the
    LLM's; default the stages') and averaged in it. One image: stages [C_s, h_s, w_s], boxes [N, 4] → [N, sum C_s]
    in bin_dtype. Builds one upsampled stage and one box's C_s x bins x bins at a time."""
    height, width = stages[0].shape[-2:]
    map_dtype, bin_dtype = stages[0].dtype, bin_dtype or stages[0].dtype
    boxes = boxes.to(device=stages[0].device, dtype=torch.float32)
    (ys, rh), (xs, rw) = _box_axes(boxes, spatial_scale, aligned)
    rows = _bin_weights(ys, rh, height, output_size, sampling_ratio)  # [N, P, H]
    cols = _bin_weights(xs, rw, width, output_size, sampling_ratio)   # [N, Q, W]
    pooled = []
    for s, stage in enumerate(stages):
        level = stage.float()
        if s:  # open_clip_encoder.py: F.interpolate in fp32, then `.to(dtype=stage.dtype)`
            level = F.interpolate(level[None], size=(height, width), mode="bilinear", align_corners=False)[0]
        level = level.to(map_dtype).float()  # fuse_model.py: the concatenated map `.float()` for RoIAlign
        pooled.append(torch.stack([torch.einsum("ph,chw,qw->cpq", rows[n], level, cols[n]).to(bin_dtype).mean((1, 2))
                                   for n in range(len(boxes))]))
    return torch.cat(pooled, dim=1)


def box_features(stages: list[torch.Tensor], image_boxes: torch.Tensor, image_size: int, output_size: int = 56,
                 sampling_ratio: int = -1, aligned: bool = False, precision: str = "fp32",
                 bin_dtype: torch.dtype | None = None) -> torch.Tensor:
    """MG-LLaVA's per-box vectors for a batch: stages [B, C_s, h_s, w_s] (s_0 the finest), image_boxes [K, 5]
    (image index, x1, y1, x2, y2) in pixels of the `image_size` input → [K, sum C_s], in the boxes' order: float32
    (precision "fp32"), or in `bin_dtype` with MG-LLaVA's casts (precision "reference", `roi_mean_reference`)."""
    if precision not in BOX_POOL_PRECISIONS:
        raise ValueError(f"box pooling precision must be one of {BOX_POOL_PRECISIONS}, got {precision!r}")
    spatial_scale = stages[0].shape[-1] / image_size  # ConvNeXt's stage 0: stride 4 (192 / 768)
    image_boxes = _indexed_boxes(image_boxes, stages[0].shape[0])
    image_of_box = image_boxes[:, 0].long()
    reference = precision == "reference"
    dtype = (bin_dtype or stages[0].dtype) if reference else torch.float32
    out = torch.empty(len(image_boxes), sum(s.shape[1] for s in stages), device=stages[0].device, dtype=dtype)
    for image in image_of_box.unique().tolist():
        mine = image_of_box == image
        args = ([s[image] for s in stages], image_boxes[mine, 1:], spatial_scale, output_size, sampling_ratio, aligned)
        out[mine] = roi_mean_reference(*args, bin_dtype=dtype) if reference else roi_mean(*args)
    return out


def naive_box_features(stages: list[torch.Tensor], boxes: torch.Tensor, image_size: int, output_size: int = 56,
                       sampling_ratio: int = -1, aligned: bool = False,
                       casts: tuple[torch.dtype, torch.dtype] | None = None) -> torch.Tensor:
    """The reference's way, for one image: upsample every stage to stage 0's size, concatenate (the full multi-stage
    map), RoIAlign, mean over the bins. stages [C_s, h_s, w_s]; boxes [N, 4] → [N, sum C_s]. casts: None (all in
    fp32), or (map dtype, bin dtype): MG-LLaVA's casts, the map rounded to the first, the bins to the second."""
    size = stages[0].shape[-2:]
    upsampled = [stages[0].float()] + [F.interpolate(s[None].float(), size=size, mode="bilinear",
                                                     align_corners=False)[0] for s in stages[1:]]
    feature_map = torch.cat(upsampled)[None]  # [1, sum C_s, H, W]
    if casts:
        feature_map = feature_map.to(casts[0]).float()
    spatial_scale = size[-1] / image_size
    bins = roi_align(feature_map, [boxes.float()], output_size, spatial_scale, sampling_ratio, aligned)
    return (bins.to(casts[1]) if casts else bins).mean((2, 3))


def with_object_tokens(features: torch.Tensor, objects: torch.Tensor, image_index: torch.Tensor) -> torch.Tensor:
    """The visual tokens in sequence order: each image's tokens, then its boxes' object tokens (MG-LLaVA's
    `[image tokens][object tokens]` at the image's place). features [n, N, D], objects [K, D], image_index [K] →
    [n * N + K, D]."""
    pieces = []
    for image in range(len(features)):
        pieces += [features[image], objects[image_index == image].to(features.dtype)]
    return torch.cat(pieces)
