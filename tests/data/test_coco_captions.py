"""The COCO caption reader: shapes, splits, resizing, and errors."""

import numpy as np
import pytest

from keras_vmoe.data import load_coco_captions
from tests.helpers import COCO_CAPTIONS
from tests.helpers import requires_coco_captions


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


def test_errors_name_the_archive(tmp_path):
    missing = tmp_path / "missing.npz"
    with pytest.raises(FileNotFoundError, match="no archive at .*missing.npz"):
        load_coco_captions(missing)
    partial = tmp_path / "partial.npz"
    np.savez(partial, jpeg=np.zeros(4, "uint8"), offsets=np.array([0, 4]))
    with pytest.raises(ValueError, match=r"lacks the arrays \['captions'\]"):
        load_coco_captions(partial)
