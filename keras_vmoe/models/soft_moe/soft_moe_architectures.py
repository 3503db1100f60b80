"""Named Soft MoE architectures from "From Sparse to Soft Mixtures of Experts".

Soft MoE S/16, B/16 and L/16 have 128 experts, S/14 and H/14 256; the MoE
layers are the last 6 (S, B), 12 (L) or 16 (H) blocks; one slot per expert;
global average pooling; query/key LayerNorm.
"""

# name: (patch, num_layers, hidden_dim, mlp_dim, num_heads, num_experts, num_moe_layers)
SOFT_MOE_ARCHITECTURES = {
    "soft_moe_s16": (16, 12, 384, 1536, 6, 128, 6),
    "soft_moe_s14": (14, 12, 384, 1536, 6, 256, 6),
    "soft_moe_b16": (16, 12, 768, 3072, 12, 128, 6),
    "soft_moe_l16": (16, 24, 1024, 4096, 16, 128, 12),
    "soft_moe_h14": (14, 32, 1280, 5120, 16, 256, 16),
}


def architecture_config(name, image_shape=(224, 224, 3)):
    if name not in SOFT_MOE_ARCHITECTURES:
        raise ValueError(f"Unknown Soft MoE architecture {name!r}; known: {sorted(SOFT_MOE_ARCHITECTURES)}.")
    patch, num_layers, hidden, mlp, heads, experts, num_moe = SOFT_MOE_ARCHITECTURES[name]
    return dict(
        image_shape=image_shape,
        patch_size=patch,
        num_layers=num_layers,
        hidden_dim=hidden,
        mlp_dim=mlp,
        num_heads=heads,
        moe_layers=tuple(range(num_layers - num_moe, num_layers)),
        num_experts=experts,
        slots_per_expert=1,
        pooling="gap",
        attention_qk_norm=True,
    )
