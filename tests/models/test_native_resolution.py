"""NaViT: patching and packing against brute-force references, packed encoders
whose per-image outputs do not depend on the other images of a sequence (dense,
V-MoE, Soft MoE), token dropping, fit on mixed sizes, saving, errors."""

import itertools

import keras
import numpy as np
import pytest

from keras_vmoe.layers import FactorizedPositionEmbedding
from keras_vmoe.layers import ImagePatcher
from keras_vmoe.layers import PatchEmbedding
from keras_vmoe.layers import SequencePacker
from keras_vmoe.layers.image_packing import patch_grid
from keras_vmoe.layers.image_packing import patchify
from keras_vmoe.layers.packing import from_image_groups
from keras_vmoe.layers.packing import image_groups
from keras_vmoe.layers.packing import segment_attention_mask
from keras_vmoe.layers.packing import to_image_groups
from keras_vmoe.models import NativeResolutionImageClassifierPreprocessor
from keras_vmoe.models import SoftMoEBackbone
from keras_vmoe.models import VisionTransformerBackbone
from keras_vmoe.models import VisionTransformerImageClassifier
from keras_vmoe.models import VMoEBackbone
from keras_vmoe.models import VMoEImageClassifier
from tests.helpers import f32_atol
from tests.helpers import to_numpy

SIZES = [(32, 16), (20, 40), (64, 64), (8, 8), (13, 57)]
MAX_IMAGES = 3


def mixed_images(sizes=SIZES, seed=0, channels=3):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, channels)).astype("uint8") for h, w in sizes]


def native_backbone(family, pooling="gap", **overrides):
    keras.utils.set_random_seed(0)
    arguments = dict(
        image_shape=(64, 64, 3),
        patch_size=8,
        num_layers=2,
        hidden_dim=16,
        mlp_dim=32,
        num_heads=2,
        pooling=pooling,
        position_embedding="factorized",
        native_resolution=True,
        max_images_per_sequence=MAX_IMAGES,
    )
    if family == "vmoe":
        # Capacity that drops nothing, and K = E: no top-K choice a last-bit
        # difference (another CPU's reduction order) could flip.
        arguments.update(moe_layers=(1,), num_experts=4, num_selected_experts=4, capacity_factor=8.0)
    elif family == "soft_moe":
        arguments.update(moe_layers=(1,), num_experts=4, slots_per_expert=2)
    arguments.update(overrides)
    cls = {"dense": VisionTransformerBackbone, "vmoe": VMoEBackbone, "soft_moe": SoftMoEBackbone}[family]
    return cls(**arguments)


# === Patching and packing (NumPy) ===


@pytest.mark.parametrize("height,width", [(1, 1), (7, 300), (300, 7), (32, 32), (50, 20), (64, 65)])
@pytest.mark.parametrize("budget", [1, 3, 16, 64])
def test_patch_grid_fills_the_budget_and_keeps_the_aspect_ratio(height, width, budget):
    rows, cols = patch_grid(height, width, (8, 8), budget, max_grid=(8, 8))
    assert 1 <= rows <= 8 and 1 <= cols <= 8 and rows * cols <= budget
    if 1 < rows < 8 and 1 < cols < 8:  # No clamp: the floors of a grid of `budget` patches.
        assert rows / (cols + 1) < height / width < (rows + 1) / cols
        assert (rows + 1) * (cols + 1) > budget


def test_patchify_matches_a_brute_force_cut():
    image = np.random.default_rng(0).normal(size=(24, 40, 3)).astype("float32")
    patches, positions = patchify(image, (8, 4))
    assert patches.shape == (3 * 10, 8 * 4 * 3) and positions.shape == (30, 2)
    for index, (row, col) in enumerate(itertools.product(range(3), range(10))):
        assert positions[index].tolist() == [row, col]
        np.testing.assert_array_equal(
            patches[index], image[row * 8 : row * 8 + 8, col * 4 : col * 4 + 4].ravel()
        )


def first_fit_reference(lengths, capacity, max_images):
    """The obvious first-fit: a list of bins, each a list of image indices."""
    bins = []
    for index, length in enumerate(lengths):
        for members in bins:
            if sum(lengths[i] for i in members) + length <= capacity and len(members) < max_images:
                members.append(index)
                break
        else:
            bins.append([index])
    return bins


@pytest.mark.parametrize("prefix", [0, 1])
def test_packing_against_brute_force(prefix):
    rng = np.random.default_rng(prefix)
    images = [
        (rng.normal(size=(n, 12)).astype("float32"), rng.integers(0, 9, (n, 2)).astype("int32"))
        for n in rng.integers(1, 15, 40)
    ]
    packer = SequencePacker(sequence_length=24, max_images=4, num_prefix_tokens=prefix)
    batch, index = packer.pack(images)
    bins = first_fit_reference([len(p) + prefix for p, _ in images], 24, 4)
    assert len(batch["segment_ids"]) == len(bins)
    for sequence, members in enumerate(bins):
        segments = batch["segment_ids"][sequence]
        offset = 0
        for slot, image in enumerate(members):
            assert index[image].tolist() == [sequence, slot]
            patches, positions = images[image]
            length = len(patches) + prefix
            assert np.all(segments[offset : offset + length] == slot + 1)
            assert np.all(batch["positions"][sequence, offset : offset + prefix] == -1)
            np.testing.assert_array_equal(
                batch["positions"][sequence, offset + prefix : offset + length], positions
            )
            np.testing.assert_array_equal(
                batch["patches"][sequence, offset + prefix : offset + length], patches
            )
            offset += length
        assert np.all(segments[offset:] == 0) and np.all(batch["patches"][sequence, offset:] == 0)


def test_stream_packs_fixed_size_batches_first_fit_and_in_order():
    rng = np.random.default_rng(2)
    images = [
        (rng.normal(size=(n, 6)).astype("float32"), rng.integers(0, 9, (n, 2)).astype("int32"))
        for n in rng.integers(1, 15, 60)
    ]
    packer = SequencePacker(sequence_length=24, max_images=3)
    batches = list(packer.stream(iter(images), num_sequences=2))
    seen = np.concatenate([stream_index for _, _, stream_index in batches])
    np.testing.assert_array_equal(seen, np.arange(len(images)))  # Every image once, in order.
    for number, (batch, index, stream_index) in enumerate(batches):
        assert batch["segment_ids"].shape == (2, 24)
        members = [images[i] for i in stream_index]
        expected, expected_index = packer.pack(members, num_sequences=2)
        np.testing.assert_array_equal(index, expected_index)
        for key in expected:
            np.testing.assert_array_equal(batch[key], expected[key])
        if number + 1 < len(batches):  # The next image fitted none of this batch's sequences.
            bins = first_fit_reference([len(p) for p, _ in members + [images[stream_index[-1] + 1]]], 24, 3)
            assert len(bins) == 3


def test_highest_token_drop_rate_keeps_a_token_per_image():
    patcher = ImagePatcher(8, 64, token_drop_rate=0.999, seed=0)
    for image in mixed_images():
        patches, positions = patcher(image, training=True)
        assert len(patches) == 1 and positions.shape == (1, 2)
        full, _ = patcher(image)  # Evaluation drops nothing.
        assert len(full) == np.prod(patch_grid(*image.shape[:2], (8, 8), 64, upscale=False))
        assert len(full) == max(1, image.shape[0] // 8) * max(1, image.shape[1] // 8)  # Native size.


def test_token_drop_rates_vary_per_image_within_the_range():
    patcher = ImagePatcher(8, 64, token_drop_rate=(0.2, 0.6), seed=0)
    image = np.zeros((64, 64, 3), "uint8")
    kept = [len(patcher(image, training=True)[0]) for _ in range(30)]
    assert min(kept) >= round(64 * 0.4) and max(kept) <= round(64 * 0.8) and len(set(kept)) > 3


def test_image_groups_against_brute_force():
    rng = np.random.default_rng(0)
    segment_ids = rng.integers(0, 4, (3, 20)).astype("int32")  # Not contiguous, with padding.
    tokens = rng.normal(size=(3, 20, 5)).astype("float32")
    groups = image_groups(segment_ids, max_images=3, max_image_tokens=9)
    grouped, mask = to_image_groups(tokens, groups)
    grouped, mask = to_numpy(grouped).reshape(3, 3, 9, 5), to_numpy(mask).reshape(3, 3, 9)
    for b, n in itertools.product(range(3), range(3)):
        members = np.flatnonzero(segment_ids[b] == n + 1)[:9]
        assert mask[b, n].sum() == len(members)
        np.testing.assert_array_equal(grouped[b, n, : len(members)], tokens[b, members])
        assert np.all(grouped[b, n, len(members) :] == 0)
    back = to_numpy(
        from_image_groups(keras.ops.convert_to_tensor(grouped.reshape(9, 9, 5)), groups, segment_ids)
    )
    kept = np.zeros_like(segment_ids, bool)
    for b, n in itertools.product(range(3), range(3)):
        kept[b, np.flatnonzero(segment_ids[b] == n + 1)[:9]] = True
    np.testing.assert_array_equal(back[kept], tokens[kept])
    assert np.all(back[~kept] == 0)


def test_no_token_attends_across_images():
    segment_ids = np.array([[1, 1, 2, 2, 2, 0, 0], [1, 3, 3, 2, 0, 0, 0]], "int32")
    mask = to_numpy(segment_attention_mask(segment_ids))
    reference = segment_ids[:, :, None] == segment_ids[:, None, :]
    np.testing.assert_array_equal(mask, reference)


def test_flattened_patches_embed_as_the_convolution():
    image = np.random.default_rng(0).normal(size=(1, 16, 24, 3)).astype("float32")
    layer = PatchEmbedding(8, 8)
    expected = to_numpy(layer(image))
    patches, _ = patchify(image[0], (8, 8))
    flat = PatchEmbedding(8, 8)
    flat.build(patches[None].shape)
    assert [tuple(w.shape) for w in flat.weights] == [tuple(w.shape) for w in layer.weights]
    flat.set_weights(layer.get_weights())
    got = to_numpy(flat(patches[None]))
    np.testing.assert_allclose(got, expected, atol=f32_atol(expected))


@pytest.mark.parametrize("kind", ["factorized", "factorized_fractional"])
def test_factorized_positions_against_numpy(kind):
    layer = FactorizedPositionEmbedding(kind, grid_size=(4, 6), max_images=2)
    positions = np.array([[[-1, -1], [0, 0], [0, 1], [1, 0], [1, 1], [0, 0], [0, 2], [0, 0]]], "int32")
    segment_ids = np.array([[1, 1, 1, 1, 1, 2, 2, 0]], "int32")
    tokens = np.zeros((1, 8, 4), "float32")
    got = to_numpy(layer(tokens, positions, segment_ids))
    rows_table, cols_table = to_numpy(layer.row_embedding), to_numpy(layer.column_embedding)
    extents = {1: (2, 2), 2: (1, 3), 0: (1, 1)}
    for t in range(8):
        r, c = positions[0, t]
        if r < 0:
            np.testing.assert_array_equal(got[0, t], 0)
            continue
        if kind == "factorized_fractional":
            rows, cols = extents[segment_ids[0, t]]
            r, c = int(np.floor(r / rows * 4)), int(np.floor(c / cols * 6))
        np.testing.assert_allclose(got[0, t], rows_table[r] + cols_table[c], rtol=1e-6)


def test_fractional_positions_survive_token_dropping():
    layer = FactorizedPositionEmbedding("factorized_fractional", grid_size=(8, 8), max_images=1)
    patcher = ImagePatcher(8, 64, max_grid=(8, 8), token_drop_rate=0.8, seed=0)
    image = np.zeros((40, 24, 3), "uint8")  # A 5 x 3 grid.
    full, _ = SequencePacker(64, 1).pack([patcher(image)])
    table = to_numpy(layer(np.zeros((1, 64, 4), "float32"), full["positions"], full["segment_ids"]))[0]
    by_position = {tuple(p): row for p, row in zip(full["positions"][0][:15].tolist(), table)}
    for _ in range(10):  # Each draw keeps 3 of 15 patches, the last among them.
        dropped, _ = SequencePacker(64, 1).pack([patcher(image, training=True)])
        got = to_numpy(layer(np.zeros((1, 64, 4), "float32"), dropped["positions"], dropped["segment_ids"]))
        kept = dropped["positions"][0][: int((dropped["segment_ids"] > 0).sum())].tolist()
        assert len(kept) == 3 and kept[-1] == [4, 2]
        for t, position in enumerate(kept):
            np.testing.assert_array_equal(got[0, t], by_position[tuple(position)])


# === Packed encoders ===


@pytest.fixture(scope="module", params=["dense", "vmoe", "soft_moe"])
def family(request):
    return request.param


@pytest.mark.parametrize("pooling", ["gap", "token", "map"])
def test_an_image_packed_with_others_gets_its_own_outputs(family, pooling):
    backbone = native_backbone(family, pooling)
    patcher = ImagePatcher(8, 16, max_grid=(8, 8), scale=1 / 127.5, offset=-1.0, upscale=True)
    packer = SequencePacker(48, MAX_IMAGES, num_prefix_tokens=int(pooling == "token"))
    patched = [patcher(image) for image in mixed_images()]
    batch, index = packer.pack(patched)
    assert len(batch["segment_ids"]) < len(patched)  # Some images share a sequence.
    packed = to_numpy(backbone(batch))
    assert packed.shape == (len(batch["segment_ids"]), MAX_IMAGES, 16)
    empty = np.ones(packed.shape[:2], bool)
    empty[index[:, 0], index[:, 1]] = False
    assert empty.any() and np.all(packed[empty] == 0)  # Empty image slots pool to zeros.
    for image, (sequence, slot) in zip(patched, index):
        alone = to_numpy(backbone(packer.pack([image])[0]))[0, 0]
        np.testing.assert_allclose(packed[sequence, slot], alone, atol=1e-5)


def test_one_token_images_have_well_defined_outputs(family):
    backbone = native_backbone(family, "map")
    patcher = ImagePatcher(8, 64, max_grid=(8, 8), token_drop_rate=0.999, seed=0)
    packer = SequencePacker(16, MAX_IMAGES)
    patched = [patcher(image, training=True) for image in mixed_images()]
    assert all(len(patches) == 1 for patches, _ in patched)
    batch, index = packer.pack(patched)
    packed = to_numpy(backbone(batch))
    assert np.all(np.isfinite(packed)) and np.all(np.abs(packed[index[:, 0], index[:, 1]]).sum(-1) > 0)
    for image, (sequence, slot) in zip(patched, index):
        alone = to_numpy(backbone(packer.pack([image])[0]))[0, 0]
        np.testing.assert_allclose(packed[sequence, slot], alone, atol=1e-5)


def test_tokens_beyond_max_image_tokens_never_reach_another_image():
    backbone = native_backbone("vmoe", "gap", max_image_tokens=4)
    rng = np.random.default_rng(5)
    images = [
        (rng.normal(size=(n, 192)).astype("float32"), np.stack([np.zeros(n), np.arange(n)], -1))
        for n in (4, 6)
    ]
    batch, _ = SequencePacker(16, MAX_IMAGES).pack(images)
    changed = {key: value.copy() for key, value in batch.items()}
    changed["patches"][batch["segment_ids"] == 1] += 3.0  # Only image 1 changes.
    before, after = to_numpy(backbone(batch)), to_numpy(backbone(changed))
    np.testing.assert_allclose(after[0, 1], before[0, 1], atol=1e-5)
    with pytest.raises(
        ValueError, match="images of up to 16 tokens \\(the backbone's max_image_tokens is 4\\)"
    ):
        VMoEImageClassifier(
            backbone,
            4,
            preprocessor=NativeResolutionImageClassifierPreprocessor.for_backbone(backbone, 16, 32),
        )


def test_a_preprocessor_that_does_not_match_the_backbone_is_refused():
    backbone = native_backbone("dense", "token")
    for options, message in [
        (dict(max_images_per_sequence=2), "max_images_per_sequence=2 \\(the backbone's: 3\\)"),
        (dict(num_prefix_tokens=0), "num_prefix_tokens=0 \\(the backbone's: 1\\)"),
        (dict(max_grid=None), "max_grid=None \\(must be within the backbone's grid \\(8, 8\\)\\)"),
        (dict(patch_size=4, max_grid=(16, 16)), "patch_size=\\(4, 4\\)"),
    ]:
        arguments = dict(patch_size=8, max_patches=16, sequence_length=40, max_images_per_sequence=3)
        arguments.update(num_prefix_tokens=1, max_grid=(8, 8))
        arguments.update(options)
        with pytest.raises(ValueError, match=f"does not match the backbone: .*{message}.*for_backbone"):
            VisionTransformerImageClassifier(
                backbone, 3, preprocessor=NativeResolutionImageClassifierPreprocessor(**arguments)
            )
    square = VisionTransformerBackbone(
        image_shape=(32, 32, 3), patch_size=8, num_layers=1, hidden_dim=16, mlp_dim=32, num_heads=2
    )
    with pytest.raises(ValueError, match="needs a backbone with native_resolution=True"):
        VisionTransformerImageClassifier(
            square, 3, preprocessor=NativeResolutionImageClassifierPreprocessor(8, 16, 40, 3)
        )


def test_other_images_do_not_change_an_images_outputs(family):
    backbone = native_backbone(family, "gap")
    patcher = ImagePatcher(8, 16, max_grid=(8, 8), scale=1 / 127.5, offset=-1.0)
    patched = [patcher(image) for image in mixed_images(SIZES[:3])]
    batch, _ = SequencePacker(64, MAX_IMAGES).pack(patched)
    assert batch["segment_ids"].shape[0] == 1
    changed = {key: value.copy() for key, value in batch.items()}
    changed["patches"][batch["segment_ids"] == 2] += 3.0  # Only image 2 changes.
    before, after = to_numpy(backbone(batch)), to_numpy(backbone(changed))
    np.testing.assert_allclose(after[0, [0, 2]], before[0, [0, 2]], atol=f32_atol(before))
    assert np.abs(after[0, 1] - before[0, 1]).max() > 1e-3


def test_sequence_routing_groups_a_whole_sequence():
    backbone = native_backbone("vmoe", packed_routing="sequence")
    patcher = ImagePatcher(8, 16, max_grid=(8, 8))
    batch, _ = SequencePacker(48, MAX_IMAGES).pack([patcher(image) for image in mixed_images()])
    assert to_numpy(backbone(batch)).shape[1:] == (MAX_IMAGES, 16)
    assert backbone.get_config()["packed_routing"] == "sequence"


# === Classifier: fit on mixed sizes, predict in order, save ===


@pytest.fixture(scope="module")
def classifier():
    keras.utils.set_random_seed(0)
    backbone = native_backbone(
        "vmoe", "map", position_embedding="factorized_fractional", parallel_block=True, use_bias=False
    )
    preprocessor = NativeResolutionImageClassifierPreprocessor.for_backbone(
        backbone,
        max_patches=(4, 16),
        sequence_length=32,
        scale=1 / 127.5,
        offset=-1.0,
        token_drop_rate=(0.0, 0.5),
        seed=0,
    )
    model = VMoEImageClassifier(backbone, num_classes=4, preprocessor=preprocessor)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), metrics=["accuracy"])
    return model


def test_fit_on_mixed_sizes_lowers_the_loss_and_predicts_in_order(classifier):
    rng = np.random.default_rng(1)
    images = mixed_images([tuple(s) for s in rng.integers(8, 64, (16, 2))], seed=1)
    labels = rng.integers(0, 4, 16)
    history = classifier.fit(images, labels, batch_size=4, epochs=4, verbose=0).history
    assert history["loss"][-1] < history["loss"][0] and "moe_auxiliary_loss" in history
    predictions = classifier.predict(images, verbose=0)
    assert predictions.shape == (16, 4)
    for i in (0, 7, 15):  # Row i is image i, whatever it was packed with.
        alone = classifier.predict([images[i]], verbose=0)[0]
        np.testing.assert_allclose(alone, predictions[i], atol=f32_atol(predictions))
    evaluation = classifier.evaluate(images, labels, verbose=0, return_dict=True)
    reference = keras.losses.sparse_categorical_crossentropy(labels, predictions, from_logits=True)
    np.testing.assert_allclose(evaluation["loss"], np.mean(to_numpy(reference)), rtol=1e-4)
    np.testing.assert_allclose(
        evaluation["accuracy"], np.mean(np.argmax(predictions, -1) == labels), rtol=1e-6
    )


def single_image_dataset(images, labels):
    import tensorflow as tf

    return tf.data.Dataset.from_generator(
        lambda: zip(images, labels),
        output_signature=(tf.TensorSpec((None, None, 3), tf.uint8), tf.TensorSpec((), tf.int64)),
    )


def test_packed_dataset_lays_out_labels_and_repacks_each_epoch(classifier):
    rng = np.random.default_rng(3)
    images = mixed_images([tuple(s) for s in rng.integers(8, 64, (12, 2))], seed=3)
    labels = rng.integers(0, 4, 12)
    dataset = classifier.preprocessor.packed_dataset(single_image_dataset(images, labels), 2, training=True)
    epochs = [[tuple(to_numpy(t) for t in (x["segment_ids"], y, w)) for x, y, w in dataset] for _ in range(2)]
    for batches in epochs:
        assert all(segments.shape == (2, 32) and y.shape == (2, MAX_IMAGES) for segments, y, _ in batches)
        # Images in order: slot by slot, the real slots hold the labels in the stream's order.
        laid_out = np.concatenate([y[w > 0] for _, y, w in batches])
        np.testing.assert_array_equal(laid_out, labels)
        assert sum(int((w > 0).sum()) for _, _, w in batches) == 12
        for segments, _, w in batches:  # A slot has weight 1 exactly when it holds an image.
            present = np.stack([(segments == slot + 1).any(-1) for slot in range(MAX_IMAGES)], -1)
            np.testing.assert_array_equal(w, present.astype("float32"))
    tokens = [sum(int((segments > 0).sum()) for segments, _, _ in batches) for batches in epochs]
    assert tokens[0] != tokens[1]  # Budgets and token dropping are redrawn each pass.


def test_fit_on_a_packed_dataset_lowers_the_loss(classifier):
    rng = np.random.default_rng(4)
    images = mixed_images([tuple(s) for s in rng.integers(8, 64, (16, 2))], seed=4)
    labels = rng.integers(0, 4, 16)
    dataset = classifier.preprocessor.packed_dataset(single_image_dataset(images, labels), 2, training=True)
    history = classifier.fit(dataset, epochs=4, verbose=0).history
    assert history["loss"][-1] < history["loss"][0]
    evaluation_data = classifier.preprocessor.packed_dataset(single_image_dataset(images, labels), 2)
    validated = classifier.fit(images[:4], labels[:4], validation_data=evaluation_data, epochs=1, verbose=0)
    assert "val_loss" in validated.history
    evaluation = classifier.evaluate(evaluation_data, verbose=0, return_dict=True)
    predictions = classifier.predict(images, verbose=0)
    losses = to_numpy(keras.losses.sparse_categorical_crossentropy(labels, predictions, from_logits=True))
    # Keras averages the batches' losses (each the mean over its images), batches weighted alike.
    counts = [int((to_numpy(w) > 0).sum()) for _, _, w in evaluation_data]
    batch_means = [chunk.mean() for chunk in np.split(losses, np.cumsum(counts)[:-1])]
    np.testing.assert_allclose(evaluation["loss"], np.mean(batch_means), rtol=1e-4)
    np.testing.assert_allclose(
        evaluation["accuracy"], np.mean(np.argmax(predictions, -1) == labels), rtol=1e-6
    )


def test_save_and_load_keep_the_options(classifier, tmp_path):
    images = mixed_images()
    expected = classifier.predict(images, verbose=0)
    classifier.save(tmp_path / "navit.keras")
    loaded = keras.saving.load_model(tmp_path / "navit.keras")
    config = loaded.backbone.get_config()
    assert config["native_resolution"] and config["parallel_block"] and config["use_bias"] is False
    assert config["position_embedding"] == "factorized_fractional"
    assert loaded.preprocessor.get_config() == classifier.preprocessor.get_config()
    np.testing.assert_allclose(loaded.predict(images, verbose=0), expected, atol=f32_atol(expected))


def test_use_bias_false_leaves_no_bias_variable(classifier):
    paths = [w.path for w in classifier.backbone.weights]
    # The LayerNorms keep their offsets; the patch embedding keeps its bias.
    biases = [p for p in paths if "bias" in p and "norm" not in p and "patch_embedding" not in p]
    assert biases == [], biases
    assert not classifier.backbone.get_layer("encoder_block_0").mlp.dense_0.use_bias


def test_a_dense_square_model_ignores_the_new_options():
    backbone = VisionTransformerBackbone(
        image_shape=(32, 32, 3), patch_size=8, num_layers=1, hidden_dim=16, mlp_dim=32, num_heads=2
    )
    config = backbone.get_config()
    assert not {"parallel_block", "use_bias", "native_resolution", "max_images_per_sequence"} & set(config)
    assert "use_bias" not in backbone.get_layer("encoder_block_0").get_config()
    restored = VisionTransformerBackbone.from_config(config)
    assert not restored.native_resolution and not restored.parallel_block and restored.use_bias


# === The parallel block (ViT-22B) against a hand computation ===


def layer_norm(x, scale, offset, epsilon=1e-6):
    mean = x.mean(-1, keepdims=True)
    variance = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(variance + epsilon) * scale + offset


def gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def attention_reference(x, attention):
    q, k, v = (
        np.einsum("td,dhk->thk", x, to_numpy(getattr(attention, name).kernel))
        for name in ("query", "key", "value")
    )
    logits = np.einsum("qhk,shk->hqs", q, k) / np.sqrt(q.shape[-1])
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("hqs,hsd->qd", weights, np.einsum("shk,hkd->hsd", v, to_numpy(attention.out.kernel)))


def test_parallel_block_against_a_hand_computation():
    from keras_vmoe.layers import EncoderBlock
    from keras_vmoe.layers import Mlp

    keras.utils.set_random_seed(0)
    block = EncoderBlock(2, Mlp(8, use_bias=False), parallel_block=True, use_bias=False)
    x = np.random.default_rng(0).normal(size=(1, 5, 4)).astype("float32")
    got = to_numpy(block(x))[0]
    norm = block.attention_norm
    normed = layer_norm(x[0], to_numpy(norm.gamma), to_numpy(norm.beta))
    mlp = block.mlp
    hidden = gelu_tanh(normed @ to_numpy(mlp.dense_0.kernel))
    expected = x[0] + attention_reference(normed, block.attention) + hidden @ to_numpy(mlp.dense_1.kernel)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert block.mlp_norm is None


def test_parallel_equals_sequential_when_attention_adds_nothing():
    from keras_vmoe.layers import EncoderBlock
    from keras_vmoe.layers import Mlp

    x = np.random.default_rng(0).normal(size=(2, 5, 8)).astype("float32")
    keras.utils.set_random_seed(0)
    sequential = EncoderBlock(2, Mlp(16))
    sequential(x)
    sequential.attention.out.kernel.assign(np.zeros_like(to_numpy(sequential.attention.out.kernel)))
    sequential.attention.out.bias.assign(np.zeros_like(to_numpy(sequential.attention.out.bias)))
    parallel = EncoderBlock(2, Mlp(16), parallel_block=True)
    parallel(x)
    for target, source in [(parallel.attention, sequential.attention), (parallel.mlp, sequential.mlp)]:
        for w, v in zip(target.weights, source.weights):
            w.assign(v)
    # With no attention, sequential's mlp_norm sees the block input, as the
    # parallel block's one norm does: give both norms its weights.
    for w, v in zip(parallel.attention_norm.weights, sequential.mlp_norm.weights):
        w.assign(v)
    for w in sequential.attention_norm.weights:
        w.assign(to_numpy(w) * 0 + 1)  # Irrelevant: the attention adds zero.
    np.testing.assert_allclose(to_numpy(parallel(x)), to_numpy(sequential(x)), atol=1e-6)


# === Bad input ===


def test_bad_input_gets_clear_errors():
    patcher = ImagePatcher(8, 16)
    with pytest.raises(ValueError, match="zero side"):
        patcher(np.zeros((0, 10, 3)))
    with pytest.raises(ValueError, match="max_patches.*>= 1"):
        ImagePatcher(8, 0)
    with pytest.raises(ValueError, match="sequence_length=1 is below one image of one patch"):
        SequencePacker(1, 2, num_prefix_tokens=1)
    with pytest.raises(ValueError, match="image 0 has 20 tokens.*nothing is cropped"):
        SequencePacker(16, 2).pack([(np.zeros((20, 4)), np.zeros((20, 2)))])
    with pytest.raises(ValueError, match="cannot fit a sequence of sequence_length=16.*nothing is cropped"):
        NativeResolutionImageClassifierPreprocessor(8, 16, 16, 2, num_prefix_tokens=1)
    preprocessor = NativeResolutionImageClassifierPreprocessor(8, 16, 32, 2, channels=3)
    with pytest.raises(ValueError, match="Image 1 has 1 channels, but the model's count is 3"):
        preprocessor.pack([np.zeros((8, 8, 3)), np.zeros((8, 8, 1))])
    with pytest.raises(ValueError, match="Image 0 has a zero side"):
        preprocessor.pack([np.zeros((8, 0, 3))])
    with pytest.raises(ValueError, match="need 2 sequences, more than num_sequences=1"):
        SequencePacker(8, 2).pack([(np.zeros((5, 4)), np.zeros((5, 2)))] * 2, num_sequences=1)
    with pytest.raises(ValueError, match="takes a dataset of \\(image, y\\)"):
        preprocessor.packed_dataset(single_image_dataset([], []).map(lambda x, y: x), 2)
    with pytest.raises(Exception, match="the dataset has no elements"):
        list(preprocessor.packed_dataset(single_image_dataset([], []), 2))
    with pytest.raises(ValueError, match="For a tf.data.Dataset of single images, use `packed_dataset"):
        preprocessor(single_image_dataset([], []))
    with pytest.raises(ValueError, match="different sizes"):
        SequencePacker(32, 2).pack(
            [(np.zeros((2, 4)), np.zeros((2, 2))), (np.zeros((2, 6)), np.zeros((2, 2)))]
        )


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(max_images_per_sequence=None), "needs max_images_per_sequence"),
        (dict(position_embedding="learned"), "position_embedding"),
        (dict(num_register_tokens=2), "does not support num_register_tokens"),
        (dict(packed_routing="token"), "packed_routing"),
        (dict(max_image_tokens=0), "max_image_tokens"),
    ],
)
def test_bad_native_resolution_options(overrides, message):
    with pytest.raises(ValueError, match=message):
        native_backbone("dense", **overrides)


def test_moe_options_that_would_mix_images_are_refused():
    with pytest.raises(ValueError, match="group_size=None"):
        native_backbone("vmoe", group_size=64)
    with pytest.raises(ValueError, match="packed_routing='sequence' is for token-choice"):
        native_backbone("soft_moe", packed_routing="sequence")


def test_dense_classifier_needs_the_native_preprocessor_for_lists():
    model = VisionTransformerImageClassifier(native_backbone("dense"), num_classes=3)
    with pytest.raises(ValueError, match="NativeResolutionImageClassifierPreprocessor"):
        model.predict(mixed_images())
