"""Which experts serve which modality: the LIMoE paper's expert analysis.

LIMoE routes image and text tokens through the same experts and reports that
modality-specific experts emerge: some experts take (almost) only image
tokens, others (almost) only text tokens. `expert_modality_counts` measures
this on a trained `LIMoEBackbone`. It encodes images and captions as the
model does (each modality on its own, eval mode, no routing noise) and counts,
for every MoE block, the token choices each expert *keeps* (after capacity
and Batch Priority Routing) per modality; choices no expert had room for are
counted apart as dropped. Text padding is not routed and not counted.

`ExpertModalityStats` then gives three views of the counts (M modalities x E
experts, modalities in the order `("image", "text")`):

- `modality_distribution[m, e]`: of modality m's kept choices, the fraction
  expert e takes (each row sums to 1);
- `token_share[m, e]`: of the tokens expert e takes, the fraction from
  modality m (each column sums to 1). It depends on how many tokens each
  modality brings (64 image patches against ~7 caption tokens on CIFAR-10);
- `balanced_share[m, e]`: the same with both modalities weighted equally,
  `modality_distribution[m, e] / sum_m' modality_distribution[m', e]`: what
  `token_share` would be if both modalities brought as many tokens. This is
  the view we use to call an expert modality-specific: `balanced_share >=
  0.9` for one modality (our choice of threshold: it then takes at least 9
  times more of that modality's tokens than of the other's, relative to
  their totals).

An expert that takes no token gets NaN shares.

Example:
```python
stats = expert_modality_counts(
    classifier.backbone, images=pixels, token_ids=ids, padding_mask=mask)
stats[3].balanced_share  # (2, E): image and text shares of each expert of block 3
stats[3].specific_experts()  # {"image": [...], "text": [...]}
```
"""

import dataclasses

import keras
import numpy as np
from keras import ops

from keras_vmoe.models.limoe.limoe_backbone import IMAGE
from keras_vmoe.models.limoe.limoe_backbone import TEXT

MODALITIES = ("image", "text")


@dataclasses.dataclass(frozen=True)
class ExpertModalityStats:
    """What one MoE block did with each modality's tokens.

    Attributes:
        counts: int (M, E): kept token choices per modality and expert.
        dropped: int (M,): token choices per modality that no expert kept.
    """

    counts: np.ndarray
    dropped: np.ndarray

    @property
    def modality_distribution(self):
        """(M, E): each modality's kept choices over the experts (rows sum to 1)."""
        return _divide(self.counts, self.counts.sum(axis=1, keepdims=True))

    @property
    def token_share(self):
        """(M, E): each expert's tokens by modality (columns sum to 1)."""
        return _divide(self.counts, self.counts.sum(axis=0, keepdims=True))

    @property
    def balanced_share(self):
        """(M, E): `token_share` with both modalities weighted equally."""
        distribution = np.nan_to_num(self.modality_distribution)
        return _divide(distribution, distribution.sum(axis=0, keepdims=True))

    @property
    def dropped_fraction(self):
        """(M,): each modality's fraction of choices dropped."""
        return _divide(self.dropped, self.counts.sum(axis=1) + self.dropped)

    def specific_experts(self, threshold=0.9):
        """{modality: experts whose balanced share of it is >= threshold}."""
        share = self.balanced_share
        return {
            modality: [int(e) for e in np.flatnonzero(share[m] >= threshold)]
            for m, modality in enumerate(MODALITIES)
        }


def _divide(numerator, denominator):
    numerator = np.asarray(numerator, "float64")
    denominator = np.broadcast_to(np.asarray(denominator, "float64"), numerator.shape)
    out = np.full(numerator.shape, np.nan)
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    return out


class RoutingProbe(keras.Model):
    """What each MoE block's router of a `LIMoEBackbone` decides, eval mode;
    a model so that `predict` compiles it once (never saved).

    Called on images (preprocessed pixels) or on `{"token_ids",
    "padding_mask"}`, each modality encoded on its own as `embed_images` /
    `embed_text` do. Returns `{"block_<i>": (B, T, K) flat slot of each token
    choice (E * C when dropped, as in `RoutingPlan.combine_index`),
    "token_modalities": (B, T)}`.
    """

    def __init__(self, backbone, **kwargs):
        super().__init__(**kwargs)
        if getattr(backbone, "native_resolution", False):
            raise ValueError(
                "Expert-modality statistics read square-image LIMoE backbones; this one has "
                "native_resolution=True (packed sequences), which they do not support yet."
            )
        self.backbone = backbone

    def call(self, inputs):
        backbone = self.backbone
        if isinstance(inputs, dict):
            x, token_modalities, attention_mask = backbone.input_tokens(
                token_ids=inputs["token_ids"], padding_mask=inputs["padding_mask"]
            )
        else:
            x, token_modalities, attention_mask = backbone.input_tokens(images=inputs)
        outputs = {"token_modalities": token_modalities}
        length = x.shape[1]
        for index, block in enumerate(backbone.blocks[: max(backbone.moe_layers) + 1]):
            x = block.attend(x, training=False, attention_mask=attention_mask)
            if index in backbone.moe_layers:
                tokens = block.router_tokens(x)  # (G, S, D)
                plan, _ = block.mlp.router(
                    tokens,
                    training=False,
                    token_modalities=ops.reshape(token_modalities, (-1, tokens.shape[1])),
                )
                outputs[f"block_{index}"] = ops.reshape(
                    plan.combine_index, (-1, length, block.mlp.router.num_selected_experts)
                )
            x = block.feed_forward(x, training=False, token_modalities=token_modalities)
        return outputs


def routed_experts(backbone, images=None, token_ids=None, padding_mask=None, batch_size=256, model=None):
    """The expert of every token choice in every MoE block, eval mode.

    Give images (preprocessed pixels) or texts (`token_ids`, `padding_mask`):
    each modality is routed on its own, as the backbone routes it by default.
    `model`: a `RoutingProbe` of the backbone, to reuse its compilation.

    Returns:
        ({block index: int (B, T, K) expert of each choice, -1 when dropped},
        int (B, T) token modalities: `IMAGE`, `TEXT` or -1 for padding).
    """
    if (images is None) == (token_ids is None):
        raise ValueError("routed_experts: give either images or token_ids (one modality).")
    if images is not None:
        inputs = np.asarray(ops.convert_to_numpy(images), "float32")
    else:
        token_ids = np.asarray(ops.convert_to_numpy(token_ids), "int32")
        if padding_mask is None:
            padding_mask = np.ones(token_ids.shape, "bool")
        inputs = {
            "token_ids": token_ids,
            "padding_mask": np.asarray(ops.convert_to_numpy(padding_mask), "bool"),
        }
    model = model or RoutingProbe(backbone)
    outputs = model.predict(inputs, batch_size=batch_size, verbose=0)
    experts = {}
    for index in backbone.moe_layers:
        moe = backbone.blocks[index].mlp
        slots = np.asarray(outputs[f"block_{index}"])
        # Slots are numbered with the capacity of a routing group, which is
        # the image's (or caption's) tokens unless the layer sets group_size.
        capacity = moe.router.capacity(moe.group_size or slots.shape[1])
        router = moe.router
        experts[index] = np.where(slots < router.num_experts * capacity, slots // capacity, -1)
    return experts, np.asarray(outputs["token_modalities"])


def count_by_modality(experts, token_modalities, num_experts):
    """(M, E) kept choices and (M,) dropped choices per modality, from
    `routed_experts`' outputs for one block."""
    counts = np.zeros((len(MODALITIES), num_experts), "int64")
    dropped = np.zeros(len(MODALITIES), "int64")
    for m, code in enumerate((IMAGE, TEXT)):
        choices = experts[token_modalities == code]  # (tokens of m, K)
        counts[m] = np.bincount(choices[choices >= 0], minlength=num_experts)
        dropped[m] = int(np.sum(choices < 0))
    return counts, dropped


def expert_modality_counts(backbone, images, token_ids, padding_mask=None, batch_size=256):
    """{MoE block index: `ExpertModalityStats`} over images and captions.

    Args:
        backbone: a `LIMoEBackbone`.
        images: (N, H, W, C) preprocessed pixels (the image converter's output).
        token_ids, padding_mask: (N', L) captions, as the preprocessor packs them.
        batch_size: examples per forward pass; each modality is routed on
            its own, as the backbone routes it by default.
    """
    if len(images) == 0 or len(token_ids) == 0:
        raise ValueError(
            "expert_modality_counts: needs at least one image and one caption, got "
            f"{len(images)} images and {len(token_ids)} captions."
        )
    if padding_mask is None:
        padding_mask = np.ones(np.shape(token_ids), "bool")
    num_experts = {index: backbone.blocks[index].mlp.num_experts for index in backbone.moe_layers}
    totals = {
        index: [np.zeros((len(MODALITIES), e), "int64"), np.zeros(len(MODALITIES), "int64")]
        for index, e in num_experts.items()
    }

    def add(experts, token_modalities):
        for index, choices in experts.items():
            counts, dropped = count_by_modality(choices, token_modalities, num_experts[index])
            totals[index][0] += counts
            totals[index][1] += dropped

    probe = RoutingProbe(backbone)
    add(*routed_experts(backbone, images=images, batch_size=batch_size, model=probe))
    add(
        *routed_experts(
            backbone, token_ids=token_ids, padding_mask=padding_mask, batch_size=batch_size, model=probe
        )
    )
    return {index: ExpertModalityStats(counts, dropped) for index, (counts, dropped) in totals.items()}
