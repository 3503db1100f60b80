"""Which expert each token goes to: routing decisions of a backbone's MoE layers.

`expert_assignments(backbone, images)` answers, for every MoE block, which
expert processes each token of each image (eval mode, as `predict` routes):

- a sparse (V-MoE) block: the expert of the token's first kept choice, in
  the router's priority order (top-1 before top-2; with expert-choice
  routing, the lowest-numbered expert that took it), or -1 when every
  choice was dropped (the token skips the MLP through the residual);
- a Soft MoE block: the expert whose slots take the largest share of the
  token's output (its combine weights summed per expert), since every
  token is a mix of all slots.

Example:
```python
assignments = keras_vmoe.models.expert_assignments(classifier.backbone, pixels)
assignments[3].shape  # (images, tokens) of block 3; values in [-1, num_experts).
```
"""

import keras
import numpy as np
from keras import ops


def router_inputs(backbone, images):
    """{block index: (G, S, D) tokens} that each MoE block's router sees.

    `images` are model inputs (already preprocessed pixels). One forward
    pass up to the last MoE block; each block's attention is rerun on its
    input to get the normalised tokens its MLP receives.
    """
    blocks = [backbone.get_layer(f"encoder_block_{index}") for index in backbone.moe_layers]
    if not blocks:
        return {}
    block_inputs = keras.Model(backbone.input, [block.input for block in blocks])(images)
    if len(blocks) == 1:  # A functional model returns a lone output unwrapped.
        block_inputs = [block_inputs]
    tokens = {}
    for index, block, x in zip(backbone.moe_layers, blocks, block_inputs):
        x = block.mlp_norm(block.attend(x))
        group_size = block.mlp.group_size or x.shape[1]
        tokens[index] = ops.reshape(x, (-1, group_size, x.shape[-1]))
    return tokens


def expert_assignments(backbone, images):
    """{block index: int array (images, tokens)} of the expert each token goes to.

    Tokens are those the block sees: with a class token it comes first; after
    a PatchMerger they are the merged tokens. -1 marks a token a sparse
    block dropped.
    """
    assignments = {}
    for index, tokens in router_inputs(backbone, images).items():
        moe = backbone.get_layer(f"encoder_block_{index}").mlp
        batch = ops.shape(images)[0]
        if moe.drops_tokens:
            plan, _ = moe.router(tokens, training=False)
            capacity = moe.router.capacity(tokens.shape[1])
            slots = keras.ops.convert_to_numpy(plan.combine_index)  # (G, S, K)
            kept = slots < moe.num_experts * capacity
            first_kept = np.argmax(kept, axis=-1)[..., None]  # (G, S, 1)
            expert = np.take_along_axis(slots // capacity, first_kept, axis=-1)[..., 0]
            expert = np.where(kept.any(axis=-1), expert, -1)
        else:
            _, combine_weights, _ = moe.router(tokens, training=False)  # (G, S, E, P)
            share = keras.ops.convert_to_numpy(ops.sum(combine_weights, axis=-1))
            expert = np.argmax(share, axis=-1)
        assignments[index] = expert.reshape(int(batch), -1).astype("int32")
    return assignments
