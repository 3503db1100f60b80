"""L2 normalisation, the one function the routers and the LIMoE towers share."""

from keras import ops


def l2_normalize(x, axis=-1, epsilon=1e-6, epsilon_rule="add"):
    """`x` scaled to unit L2 norm along `axis`.

    Two conventions of the references, kept apart by `epsilon_rule`:
    `"add"`, vmoe's Soft MoE router: `x * rsqrt(sum(x^2) + epsilon)`;
    `"max"`, the contrastive towers' (big_vision, CLIP): `x * rsqrt(max(sum(x^2), epsilon))`.
    """
    squares = ops.sum(ops.square(x), axis=axis, keepdims=True)
    if epsilon_rule == "add":
        return x * ops.rsqrt(squares + epsilon)
    if epsilon_rule == "max":
        return x * ops.rsqrt(ops.maximum(squares, epsilon))
    raise ValueError(f"l2_normalize: epsilon_rule must be 'add' or 'max', got {epsilon_rule!r}.")
