"""Transport plans between tokens and experts: the solvers of vmoe's OT routers.

Pure `keras.ops` functions on routing groups, (G, S, E) in and out, written to
reproduce what google-research/vmoe's `projects/sparsity_constrained_ot`
routers get from ott-jax 0.2 and jaxopt 0.8 (the fixtures' versions), without
either library:

- `sinkhorn_plan`: entropic OT, ott's `sinkhorn(Geometry(cost=-logits,
  epsilon=1), lse_mode=False)` with a fixed number of iterations (vmoe sets
  min = max iterations, so ott runs 10 * floor(maxiter / 10) of them and never
  checks convergence). Every token has mass 1, every expert S / E.
- `semi_dual_plan`: sparsity-constrained (k-sparse) or quadratically
  regularised OT, jaxopt's `_regularized_transport_semi_dual(gamma=1)`
  solved by `OptaxSolver(optax.adam(lr), maxiter, tol=1e-3)`: at least one
  Adam step, then more while the gradient norm of the last one exceeded the
  tolerance and fewer than `max_steps` were done (per group).

`token_mask` (G, S) bool, where given, gives padding no mass: it takes no part
in the plan, and the experts' mass is (real tokens) / E.
"""

from keras import ops

from keras_vmoe import ops as moe_ops

ADAM_BETA_1, ADAM_BETA_2, ADAM_EPSILON = 0.9, 0.999, 1e-8  # optax.adam's defaults.


def _marginals(tokens_shape, token_mask):
    """(G, S) token mass and (G, 1) mass of each expert (real tokens / E)."""
    num_groups, group_size, num_experts = tokens_shape
    if token_mask is None:
        token_mass = ops.ones((num_groups, group_size), "float32")
    else:
        token_mass = ops.cast(token_mask, "float32")
    expert_mass = ops.sum(token_mass, axis=1, keepdims=True) / num_experts
    return token_mass, expert_mass


def sinkhorn_plan(logits, num_iterations, token_mask=None):
    """Entropic transport plan of similarity `logits` (G, S, E), float32.

    In kernel mode, as ott's Sinkhorn with `lse_mode=False` and epsilon 1:
    K = exp(logits), u = 1, v = 1; each iteration v = b / (K^T u), then
    u = a / (K v) (a zero denominator counts as 1); plan = exp(log u + log v +
    logits), whose rows (tokens) sum to 1 and columns (experts) to about S/E.
    With `num_iterations=0` the plan is exp(logits). Differentiable (through
    the unrolled iterations).
    """
    logits = ops.cast(logits, "float32")
    token_mass, expert_mass = _marginals(ops.shape(logits), token_mask)
    kernel = ops.exp(logits)
    if token_mask is not None:
        kernel = kernel * token_mass[..., None]
    u = ops.ones_like(token_mass)
    v = ops.ones_like(kernel[:, 0, :])
    for _ in range(num_iterations):
        kernel_u = ops.einsum("gse,gs->ge", kernel, u)
        v = expert_mass / ops.where(kernel_u > 0, kernel_u, 1.0)
        kernel_v = ops.einsum("gse,ge->gs", kernel, v)
        u = token_mass / ops.where(kernel_v > 0, kernel_v, 1.0)
    if num_iterations == 0:
        return kernel
    # exp(f_i + g_j + logits_ij), f = log u, g = log v; u = 0 (padding) -> 0.
    return ops.exp(ops.log(u)[..., None] + ops.log(v)[:, None, :] + logits)


def simplex_projection(x, k=None):
    """Euclidean projection of each row (last axis) of `x` onto the probability
    simplex, with at most `k` non-zeros when `k` is given (jaxopt's
    `projection_sparse_simplex`: the k largest entries, the lower index first
    among equal ones, projected; zeros elsewhere), else dense
    (`projection_simplex`)."""
    length = x.shape[-1]
    k = length if k is None else min(k, length)
    values, indices = moe_ops.top_k(x, k)  # Sorted, decreasing.
    cumulative = ops.cumsum(values, axis=-1)
    ranks = ops.arange(1, k + 1, dtype=values.dtype)
    support = ops.sum(
        ops.cast(1.0 / ranks + values - cumulative / ranks > 0, "int32"), axis=-1, keepdims=True
    )
    support = ops.maximum(support, 1)
    threshold = (ops.take_along_axis(cumulative, support - 1, axis=-1) - 1.0) / ops.cast(
        support, values.dtype
    )
    projected = ops.relu(values - threshold)  # (..., k)
    if k == length:
        # Back to the input's order: the inverse permutation of `indices`.
        inverse = ops.argsort(indices, axis=-1)
        return ops.take_along_axis(projected, inverse, axis=-1)
    return _scatter_rows(projected, indices, length)


def _scatter_rows(values, indices, length):
    """Rows of `length` zeros with `values` (..., k) at `indices` (..., k)."""
    lead = ops.shape(values)[:-1]
    rows = 1
    for size in lead:
        rows *= size
    k = values.shape[-1]
    offsets = ops.reshape(ops.arange(0, rows, dtype="int32") * length, (rows, 1))
    flat = ops.reshape(ops.reshape(ops.cast(indices, "int32"), (rows, k)) + offsets, (-1, 1))
    out = ops.zeros((rows * length,), values.dtype)
    out = ops.scatter_update(out, flat, ops.reshape(values, (-1,)))
    return ops.reshape(out, (*lead, length))


def semi_dual_plan(
    similarity, row_mass, column_mass, k=None, max_steps=20, learning_rate=1e-2, tolerance=1e-3
):
    """Regularised OT plan by jaxopt's semi-dual, solved with Adam as vmoe does.

    The problem is laid out by columns: `similarity` (G, N, M) holds, for each
    of the N columns, its similarity to the M rows; `row_mass` (G, M) and
    `column_mass` (G, N) are the marginals. With potentials alpha (G, M) = 0,
    each Adam step computes, per column n, P_n = proj((alpha + similarity_n)
    / b_n) (the simplex projection with at most `k` non-zeros, or dense) and
    the gradient sum_n b_n P_n - a, and moves alpha by optax's Adam
    (b1 0.9, b2 0.999, eps 1e-8, bias-corrected). A group stops after a step
    whose gradient norm was at most `tolerance` (jaxopt's OptaxSolver: at least
    one step, at most `max_steps`). Returns the plan (G, N, M): b_n * P_n at
    the final alpha, each column summing to its mass b_n.

    The plan is constant for automatic differentiation (vmoe's routers use it
    only to choose which pairs to dispatch).
    """
    similarity = ops.stop_gradient(ops.cast(similarity, "float32"))
    row_mass = ops.cast(row_mass, "float32")
    column_mass = ops.cast(column_mass, "float32")[..., None]  # (G, N, 1)
    safe_mass = ops.where(column_mass > 0, column_mass, 1.0)

    def columns(alpha):
        return simplex_projection((alpha[:, None, :] + similarity) / safe_mass, k) * column_mass

    alpha = ops.zeros_like(row_mass)
    first_moment, second_moment = ops.zeros_like(alpha), ops.zeros_like(alpha)
    active = ops.ones(ops.shape(alpha)[:1], "bool")  # (G,): still stepping.
    for step in range(1, max_steps + 1):
        gradient = ops.sum(columns(alpha), axis=1) - row_mass  # (G, M)
        new_first = ADAM_BETA_1 * first_moment + (1 - ADAM_BETA_1) * gradient
        new_second = ADAM_BETA_2 * second_moment + (1 - ADAM_BETA_2) * ops.square(gradient)
        update = (new_first / (1 - ADAM_BETA_1**step)) / (
            ops.sqrt(new_second / (1 - ADAM_BETA_2**step)) + ADAM_EPSILON
        )
        keep = active[:, None]
        alpha = ops.where(keep, alpha - learning_rate * update, alpha)
        first_moment = ops.where(keep, new_first, first_moment)
        second_moment = ops.where(keep, new_second, second_moment)
        active = ops.logical_and(active, ops.sqrt(ops.sum(ops.square(gradient), axis=-1)) > tolerance)
    return ops.stop_gradient(columns(alpha))
