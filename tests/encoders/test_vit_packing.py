"""NativeResolutionProcessor / packing helpers: resize rules vs transformers, patch order, token budgets, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from genvis.encoders import (
    NativeResolutionProcessor,
    naflex_size,
    patchify_frames,
    smart_resize,
    token_coordinates,
    tokens_to_grids,
)

SIZES = [(1, 1), (13, 900), (224, 224), (480, 640), (1080, 1920), (4000, 30), (57, 999), (3000, 4000)]


@pytest.mark.parametrize(("height", "width"), SIZES)
def test_resize_rules_match_transformers(height, width):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as reference_smart
    from transformers.models.siglip2.image_processing_pil_siglip2 import get_image_size_for_max_num_patches

    if max(height, width) / min(height, width) <= 200:
        expected = reference_smart(height, width, factor=28, min_pixels=56 * 56, max_pixels=28 * 28 * 1280)
        assert smart_resize(height, width, 28, 56 * 56, 28 * 28 * 1280) == tuple(expected)
    for budget in (16, 256, 1024):
        assert naflex_size(height, width, 16, budget) == tuple(
            get_image_size_for_max_num_patches(height, width, 16, budget)
        )


def test_patch_rows_match_the_qwen2_vl_image_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    image = torch.rand(3, 56, 84)
    reference = Qwen2VLImageProcessorPil(do_resize=False, do_rescale=False, do_normalize=False, patch_size=14)
    expected = reference(images=[image], return_tensors="pt")
    processor = NativeResolutionProcessor(patch_size=14, temporal_patch_size=2, merge_size=2, image_mean=None)
    ours = processor([image])
    assert ours.grid_thw.tolist() == expected["image_grid_thw"].tolist()
    torch.testing.assert_close(ours.pixel_values, expected["pixel_values"].float())


def test_coordinates_blocking_and_grids_invert():
    grid_thw = torch.tensor([[2, 4, 6], [1, 2, 2]])
    coords = token_coordinates(grid_thw, merge_size=2)
    assert coords[:8].tolist() == [
        [0, 0, 0],
        [0, 0, 1],
        [0, 1, 0],
        [0, 1, 1],
        [0, 0, 2],
        [0, 0, 3],
        [0, 1, 2],
        [0, 1, 3],
    ]
    # a raster map blocked by patchify_frames and un-blocked by tokens_to_grids comes back unchanged
    frames = torch.arange(2 * 1 * 16 * 24, dtype=torch.float32).reshape(2, 1, 16, 24)
    patches, grid = patchify_frames(frames, patch_size=4, merge_size=2)
    maps = tokens_to_grids(patches, torch.tensor([grid]), merge_size=2)[0]  # (t, h, w, 16)
    assert maps.shape == (2, 4, 6, 16)
    torch.testing.assert_close(maps[1, 2, 3].reshape(4, 4), frames[1, 0, 8:12, 12:16])


def test_processor_accepts_pil_uint8_and_clips():
    processor = NativeResolutionProcessor(patch_size=8, temporal_patch_size=2)
    pil = Image.fromarray(np.full((16, 24, 3), 255, dtype=np.uint8))
    packed = processor([pil, torch.zeros(3, 3, 8, 8, dtype=torch.uint8)])
    assert packed.grid_thw.tolist() == [[1, 2, 3], [2, 1, 1]]  # 3 frames padded to 4 by repeating the last
    assert packed.pixel_values.shape == (8, 3 * 2 * 64)
    assert packed.pixel_values[:6].eq(1.0).all() and packed.pixel_values[6:].eq(-1.0).all()  # (x - 0.5) / 0.5
    assert packed.cu_seqlens.tolist() == [0, 6, 8]


def test_bad_images_raise_or_resize_to_budget_when_asked():
    processor = NativeResolutionProcessor(patch_size=16, max_num_patches=64)
    with pytest.raises(ValueError, match=r"item 1: expected 3 channels .* got 4"):
        processor([torch.rand(3, 32, 32), torch.rand(4, 32, 32)])
    with pytest.raises(ValueError, match=r"item 0: image of 8x64 pixels is smaller than one 16x16 patch"):
        processor([torch.rand(3, 8, 64)])
    with pytest.raises(ValueError, match=r"1024x1024 gives 4096 patches, over max_num_patches=64"):
        processor([torch.rand(3, 1024, 1024)])
    with pytest.raises(ValueError, match=r"size 40x32 is not a multiple of patch_size \* merge_size = 16"):
        processor([torch.rand(3, 40, 32)])
    with pytest.raises(ValueError, match=r"batch has 128 patches, over max_total_patches=100"):
        NativeResolutionProcessor(patch_size=16, max_total_patches=100)([torch.rand(3, 128, 128)] * 2)

    # asked to fit the budget: resized, never over it, aspect ratio kept
    smart = NativeResolutionProcessor(patch_size=16, merge_size=2, resize_mode="smart", max_num_patches=64)
    packed = smart([torch.rand(3, 1024, 2048), torch.rand(3, 5, 7)])
    assert packed.grid_thw.tolist() == [
        [1, 4, 10],
        [1, 2, 4],
    ]  # 40 <= 64 patches; the tiny image is upscaled past min_num_patches
    naflex = NativeResolutionProcessor(patch_size=16, resize_mode="naflex", max_num_patches=64)
    grid = naflex([torch.rand(3, 1000, 2000)]).grid_thw[0].tolist()
    assert grid[1] * grid[2] <= 64 and grid[2] == 2 * grid[1]
    with pytest.raises(ValueError, match=r"aspect ratio .* over the limit"):
        smart([torch.rand(3, 4, 1000)])
