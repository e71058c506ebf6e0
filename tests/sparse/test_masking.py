import pytest
import torch

from spark_det.sparse.masking import ActiveMask, num_visible, random_visible_mask, upsample_mask


@pytest.mark.parametrize("grid,ratio", [((7, 7), 0.6), ((4, 10), 0.6), ((12, 12), 0.75), ((1, 1), 0.6)])
def test_every_image_keeps_exactly_round_hw_times_one_minus_ratio_patches(grid, ratio):
    visible = random_visible_mask(16, grid, ratio, torch.Generator().manual_seed(1))
    assert visible.shape == (16, 1, *grid) and visible.dtype == torch.bool
    expected = max(1, round(grid[0] * grid[1] * (1 - ratio)))
    assert visible.flatten(1).sum(1).tolist() == [expected] * 16


def test_masks_are_reproducible_from_a_seed_and_differ_between_images_and_seeds():
    a = random_visible_mask(8, (7, 7), 0.6, torch.Generator().manual_seed(3))
    b = random_visible_mask(8, (7, 7), 0.6, torch.Generator().manual_seed(3))
    c = random_visible_mask(8, (7, 7), 0.6, torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a[0], a[1])


def test_invalid_mask_ratio_is_rejected():
    with pytest.raises(ValueError, match="mask_ratio"):
        num_visible((7, 7), 1.0)


def test_upsampled_mask_repeats_each_patch_and_rejects_non_multiples():
    visible = torch.tensor([[True, False], [False, True]]).view(1, 1, 2, 2)
    up = upsample_mask(visible, (4, 6))
    assert up.shape == (1, 1, 4, 6)
    assert up[0, 0, :2, :3].all() and not up[0, 0, :2, 3:].any()
    with pytest.raises(ValueError, match="not a multiple"):
        upsample_mask(visible, (5, 6))


def test_active_mask_is_scoped_and_reentrant():
    active = ActiveMask()
    outer = torch.ones(1, 1, 2, 2, dtype=torch.bool)
    inner = torch.zeros(1, 1, 2, 2, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="without a mask"):
        active.at((4, 4))
    with active.use(outer):
        assert active.at((4, 4)).all()
        with active.use(inner):
            assert not active.at((4, 4)).any()
        assert active.at((4, 4)).all()
    assert not active.is_set


def test_a_nested_use_of_the_same_mask_shares_its_row_indices_and_another_mask_does_not():
    """SparK's densify runs inside the encoder's prediction context: one index tensor per
    resolution for the whole step (backward keeps each one it is given)."""
    active = ActiveMask()
    visible = random_visible_mask(2, (2, 2), 0.5, torch.Generator().manual_seed(0))
    with active.use(visible):
        rows = active.rows((4, 4))
        with active.use(visible):
            assert active.rows((4, 4)) is rows
            with active.use(visible.clone()):
                assert active.rows((4, 4)) is not rows
                assert torch.equal(active.rows((4, 4)), rows)
    with active.use(visible):  # a new outermost context starts afresh
        assert active.rows((4, 4)) is not rows


def test_row_indices_are_int32_where_they_fit():
    """Half the bytes of int64 in every gather and scatter that backward keeps."""
    active = ActiveMask()
    with active.use(torch.ones(2, 1, 2, 2, dtype=torch.bool)):
        assert active.rows((8, 8)).dtype == torch.int32
        assert torch.equal(active.rows((8, 8)), torch.arange(128, dtype=torch.int32))


@pytest.mark.parametrize("grid,ratio,size,stride", [((2, 2), 0.5, (8, 8), 1), ((2, 3), 0.6, (8, 12), 2),
                                                     ((7, 7), 0.6, (56, 56), 4), ((3, 3), 0.4, (3, 3), 1)])
def test_a_known_visible_count_gives_the_same_row_indices_with_a_static_shape(grid, ratio, size, stride):
    """What torch.compile needs: no boolean indexing (a shape that depends on the mask's values)."""
    visible = random_visible_mask(4, grid, ratio, torch.Generator().manual_seed(0))
    active = ActiveMask()
    with active.use(visible):
        expected, samples = active.rows(size, stride), active.sample_of_row(size)
    with active.use(visible, per_image=num_visible(grid, ratio)):
        assert active.count_known
        static = active.rows(size, stride)
        assert static.dtype == expected.dtype == torch.int32
        assert torch.equal(static, expected)
        assert torch.equal(active.sample_of_row(size), samples)


def test_a_stride_the_mask_patches_do_not_divide_falls_back_to_boolean_indexing():
    """Stride 3 over patches 2 positions wide: how many positions a patch covers depends on where it is."""
    visible = random_visible_mask(2, (3, 3), 0.5, torch.Generator().manual_seed(1))
    active = ActiveMask()
    with active.use(visible):
        expected = active.rows((6, 6), 3)
    with active.use(visible, per_image=num_visible((3, 3), 0.5)):
        assert torch.equal(active.rows((6, 6), 3), expected)


def test_a_wrong_visible_count_is_refused():
    visible = random_visible_mask(2, (4, 4), 0.5, torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError, match="7 visible patches per image"):
        with ActiveMask().use(visible, per_image=7):  # it has 8
            pass
