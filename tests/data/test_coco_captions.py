"""The COCO caption-pair reader: squared, resized images with their captions; errors."""

import numpy as np
import pytest

from keras_vmoe.data import load_coco_captions
from tests.helpers import COCO_CAPTIONS
from tests.helpers import requires_coco_captions


@requires_coco_captions
def test_images_come_squared_and_resized_with_their_captions():
    images, captions = load_coco_captions(COCO_CAPTIONS, image_size=48)
    with np.load(COCO_CAPTIONS) as archive:
        expected_captions, splits = archive["captions"], archive["split"]
    assert images.shape == (len(expected_captions), 48, 48, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(captions, expected_captions)
    # Real photographs, not an all-black decode.
    assert 40 < images.mean() < 200 and images.std() > 30

    # Without image_size: each photograph at its own size.
    photos, _ = load_coco_captions(COCO_CAPTIONS, limit=2)
    assert len(photos) == 2 and photos[0].ndim == 3 and photos[0].shape[0] != 48

    val_images, val_captions = load_coco_captions(str(COCO_CAPTIONS), 16, split="val2017", limit=5)
    first_val = int(np.flatnonzero(splits == "val2017")[0])
    assert val_images.shape == (5, 16, 16, 3)
    np.testing.assert_array_equal(val_captions, expected_captions[first_val : first_val + 5])


@requires_coco_captions
def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no caption archive at"):
        load_coco_captions(tmp_path / "missing.npz", 32)
    with pytest.raises(ValueError, match="image_size must be None or an int >= 1, got 0"):
        load_coco_captions(COCO_CAPTIONS, 0)
    with pytest.raises(ValueError, match="split 'test2017' not in .*'train2017', 'val2017'"):
        load_coco_captions(COCO_CAPTIONS, 32, split="test2017")
    with pytest.raises(ValueError, match="limit must be None or an int >= 0, got -1"):
        load_coco_captions(COCO_CAPTIONS, 32, limit=-1)
    np.savez(tmp_path / "no_captions.npz", jpeg=np.zeros(3, "uint8"), offsets=np.array([0, 3]))
    with pytest.raises(ValueError, match=r"lacks the arrays \['captions'\]"):
        load_coco_captions(tmp_path / "no_captions.npz", 32)


@requires_coco_captions
def test_reads_the_159_images_and_795_captions():
    images, captions = load_coco_captions(COCO_CAPTIONS, image_size=32)
    assert images.shape == (159, 32, 32, 3) and images.dtype == np.uint8
    assert captions.shape == (159, 5) and all(len(str(c)) > 0 for c in captions.ravel())
    assert 20 < images.mean() < 235 and images.std() > 10  # Decoded photos, not blank.
    originals, same_captions = load_coco_captions(COCO_CAPTIONS)
    assert isinstance(originals, list) and len(originals) == 159
    assert max(max(image.shape[:2]) for image in originals) <= 256  # As the archive's README says.
    np.testing.assert_array_equal(same_captions, captions)
    with np.load(COCO_CAPTIONS) as archive:
        splits = archive["split"]
    sizes = {}
    for split in sorted(set(splits.tolist())):
        part, part_captions = load_coco_captions(COCO_CAPTIONS, image_size=8, split=split)
        np.testing.assert_array_equal(part_captions, captions[splits == split])
        sizes[split] = len(part)
    assert sum(sizes.values()) == 159
    with pytest.raises(ValueError, match="split 'test2017' not in"):
        load_coco_captions(COCO_CAPTIONS, split="test2017")
