"""Named V-MoE architectures from the paper and vmoe's `configs/vmoe_paper`.

Names read `vmoe_<variant><patch>_<placement>_e<E>_k<K>`, e.g.
`vmoe_s32_last2_e8_k2`, or `vit_<variant><patch>` for the dense ViT. V-MoE S
is vmoe's own small variant: 8 blocks of width 512, MLP 2048, 8 heads (not the
12-block ViT-S). Paper models classify from the class token through a tanh
pre-logits layer of the hidden width.

PatchMerger ("Learning to Merge Tokens in Vision Transformers") models add
`_pm<M>`: `vit_<variant><patch>_pm8` and `vmoe_<variant><patch>_every2_e<E>_k<K>_pm8`
merge the patch tokens into M = 8 after the middle block (block
num_layers / 2 - 1, e.g. after block 5 of ViT-B's 12), the paper's main
setting; the class token passes the merger unmerged. Other token counts or
placements: pass `patch_merger=dict(after_block=..., num_tokens=...)` to
`from_architecture`.
"""

import re

from keras_vmoe.models.encoder_stack import every_n
from keras_vmoe.models.encoder_stack import last_n

# variant: (num_layers, hidden_dim, mlp_dim, num_heads)
VARIANTS = {
    "s": (8, 512, 2048, 8),
    "b": (12, 768, 3072, 12),
    "l": (24, 1024, 4096, 16),
    "h": (32, 1280, 5120, 16),
}
PATCHES = {"s": (32,), "b": (32, 16), "l": (32, 16), "h": (14,)}
_NAME = re.compile(
    r"^(?:vmoe_(?P<variant>[sblh])(?P<patch>\d+)_(?P<where>every|last)(?P<n>\d+)"
    r"_e(?P<experts>\d+)_k(?P<k>\d+)|vit_(?P<dense_variant>[sblh])(?P<dense_patch>\d+))"
    r"(?:_pm(?P<merged_tokens>\d+))?$"
)


# Tokens out of the PatchMerger of the `_pm` names.
PATCH_MERGER_TOKENS = (8,)


def _names():
    names = []
    for variant, patches in PATCHES.items():
        for patch in patches:
            names.append(f"vit_{variant}{patch}")
            names += [f"vit_{variant}{patch}_pm{m}" for m in PATCH_MERGER_TOKENS]
            for where in ("every2", "last2", "last5"):
                for experts in (8, 32):
                    for k in (1, 2):
                        names.append(f"vmoe_{variant}{patch}_{where}_e{experts}_k{k}")
                        if where == "every2":
                            names += [
                                f"vmoe_{variant}{patch}_{where}_e{experts}_k{k}_pm{m}"
                                for m in PATCH_MERGER_TOKENS
                            ]
    return names


VMOE_ARCHITECTURES = _names()


def architecture_config(name, image_shape=(224, 224, 3)):
    """Backbone arguments of a named architecture, as vmoe's configs give them."""
    match = _NAME.match(name)
    if not match or name not in VMOE_ARCHITECTURES:
        raise ValueError(
            f"Unknown V-MoE architecture {name!r}. Names look like "
            "'vmoe_s32_last2_e8_k2', 'vit_b16' or 'vit_b16_pm8'; the known ones are "
            "keras_vmoe.models.VMoEBackbone.architectures."
        )
    variant = match["variant"] or match["dense_variant"]
    patch = int(match["patch"] or match["dense_patch"])
    num_layers, hidden_dim, mlp_dim, num_heads = VARIANTS[variant]
    config = dict(
        image_shape=image_shape,
        patch_size=patch,
        num_layers=num_layers,
        hidden_dim=hidden_dim,
        mlp_dim=mlp_dim,
        num_heads=num_heads,
        pooling="token",
        representation_size=hidden_dim,
    )
    if match["variant"]:
        n = int(match["n"])
        place = every_n if match["where"] == "every" else last_n
        num_patches = (image_shape[0] // patch) * (image_shape[1] // patch) + 1
        config.update(
            moe_layers=place(n, num_layers),
            num_experts=int(match["experts"]),
            num_selected_experts=int(match["k"]),
            capacity_factor=1.05,
            # vmoe: 8 images per group (the smallest per-device batch).
            group_size=8 * num_patches,
            router_options=dict(importance_loss_weight=0.005, load_loss_weight=0.005),
        )
    if match["merged_tokens"]:
        config["patch_merger"] = dict(after_block=num_layers // 2 - 1, num_tokens=int(match["merged_tokens"]))
    return config
