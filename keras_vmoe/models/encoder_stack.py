"""The pieces every encoder stack shares: its blocks (`encoder_blocks`, with
a dense `Mlp` or a MoE layer from `moe_factory`), V-MoE's placements
(`every_n`, `last_n`) and the checks of the backbones' arguments."""

from keras_vmoe.layers.encoder import EncoderBlock
from keras_vmoe.layers.mlp import Mlp
from keras_vmoe.validation import as_pair
from keras_vmoe.validation import check_int


def moe_factory(layer_class, num_experts, mlp_dim, **arguments):
    """`make(index, **options) -> a new MoE layer` for the blocks in
    `moe_layers` (`options`: the encoder's own, such as `use_bias=False`).

    One layer is built at once, so that bad arguments fail before anything
    else is; every block gets its own layer (named `"moe"`) of the same config.
    """
    layer_class(num_experts, mlp_dim, name="moe", **arguments)
    return lambda index, **options: layer_class(num_experts, mlp_dim, name="moe", **arguments, **options)


def encoder_blocks(
    num_layers,
    num_heads,
    mlp_dim,
    moe_layers=(),
    make_moe=None,
    approximate_gelu=True,
    dropout_rate=0.0,
    dtype=None,
    use_bias=True,
    **block_options,
):
    """The Transformer blocks of an encoder: `encoder_block_<i>`, with a dense
    `Mlp` or, for `i` in `moe_layers`, the layer `make_moe(i)` returns.

    `block_options` go to every `EncoderBlock` (attention options,
    LayerNorm epsilon, LayerScale, `parallel_block`); `use_bias=False` to
    the blocks, their MLPs and their MoE layers (ViT-22B).
    """
    bias = {} if use_bias else {"use_bias": False}  # Configs of biased models stay as before.
    blocks = []
    for index in range(num_layers):
        if index in moe_layers:
            mlp = make_moe(index, **bias)
        else:
            mlp = Mlp(mlp_dim, approximate_gelu, dropout_rate, dtype=dtype, name="mlp", **bias)
        blocks.append(
            EncoderBlock(
                num_heads,
                mlp,
                dropout_rate=dropout_rate,
                dtype=dtype,
                name=f"encoder_block_{index}",
                **bias,
                **block_options,
            )
        )
    return blocks


def every_n(n, num_layers):
    """V-MoE's "Every-n" placement: blocks n-1, 2n-1, ... (vmoe configs)."""
    return tuple(range(n - 1, num_layers, n))


def last_n(n, num_layers):
    """V-MoE's "Last-n" placement: the last n odd blocks (vmoe configs)."""
    return tuple(range(1, num_layers, 2))[-n:]


def check_moe_layers(moe_layers, num_layers, owner):
    moe_layers = tuple(moe_layers or ())
    for index in moe_layers:
        check_int("moe_layers index", index, owner=owner)
        if not 0 <= index < num_layers:
            raise ValueError(
                f"{owner}: moe_layers has block index {index}, but the encoder has "
                f"blocks 0 to {num_layers - 1} (num_layers={num_layers})."
            )
    if len(set(moe_layers)) != len(moe_layers):
        raise ValueError(f"{owner}: moe_layers repeats a block index: {moe_layers}.")
    return tuple(sorted(int(i) for i in moe_layers))


def check_image_and_patch_size(image_shape, patch_size, owner):
    """Validates an (height, width, channels) image shape and a patch size that
    divides it; returns them as a tuple and an (int, int) pair."""
    image_shape = tuple(image_shape)
    if len(image_shape) != 3:
        raise ValueError(f"{owner}: image_shape must be (height, width, channels), got {image_shape}.")
    patch_size = as_pair("patch_size", patch_size, owner=owner)
    for axis, name in ((0, "height"), (1, "width")):
        size = check_int(f"image {name}", image_shape[axis], minimum=1, owner=owner)
        if size % patch_size[axis]:
            raise ValueError(
                f"{owner}: patch_size {patch_size} does not divide the image "
                f"{name} {size} (image_shape={image_shape})."
            )
    return image_shape, patch_size


PATCH_MERGER_KEYS = ("after_block", "num_tokens")


def check_patch_merger(patch_merger, num_layers, num_patches, owner):
    """Validates `patch_merger` and returns it as a plain dict (or None)."""
    if patch_merger is None:
        return None
    usage = "a dict(after_block=<block index>, num_tokens=<tokens out>)"
    if not isinstance(patch_merger, dict):
        raise ValueError(f"{owner}: patch_merger must be None or {usage}, got {patch_merger!r}.")
    if set(patch_merger) != set(PATCH_MERGER_KEYS):
        raise ValueError(f"{owner}: patch_merger must be {usage}; got the keys {sorted(patch_merger)}.")
    after_block = patch_merger["after_block"]
    check_int("patch_merger after_block", after_block, owner=owner)
    if num_layers < 2:
        raise ValueError(
            f"{owner}: a patch_merger needs num_layers >= 2, since at least one block must "
            f"follow the merger; got num_layers={num_layers}."
        )
    if not 0 <= after_block <= num_layers - 2:
        raise ValueError(
            f"{owner}: patch_merger after_block={after_block}, but the encoder has blocks 0 "
            f"to {num_layers - 1} (num_layers={num_layers}) and at least one block must "
            f"follow the merger, so after_block must be in 0 to {num_layers - 2}."
        )
    num_tokens = check_int("patch_merger num_tokens", patch_merger["num_tokens"], minimum=1, owner=owner)
    if num_tokens > num_patches:
        raise ValueError(
            f"{owner}: patch_merger num_tokens={num_tokens} is more than the {num_patches} "
            "patch tokens it would merge; a PatchMerger can only reduce the tokens."
        )
    return dict(after_block=int(after_block), num_tokens=num_tokens)


def rescale_group_size(moe, tokens_before, tokens_after, owner):
    """Makes a MoE layer behind a PatchMerger route groups of as many images
    as the layers in front of it: `group_size` counts tokens of the unmerged
    sequence (vmoe's configs give it as images x tokens per image)."""
    group_size = getattr(moe, "group_size", None)
    if group_size is None:
        return
    if group_size % tokens_before:
        raise ValueError(
            f"{owner}: with a patch_merger, group_size must be a whole number of images, "
            f"a multiple of the {tokens_before} tokens per image before the merger (got "
            f"group_size={group_size}); MoE layers after the merger then route as many "
            "images per group on their merged tokens. Or use group_size=None (one image "
            "per group)."
        )
    moe.group_size = group_size // tokens_before * tokens_after
