"""NumPy float64 references of the optimal-transport routers' plans (vmoe's semantics)."""

import numpy as np


def np_softmax(x, axis=-1):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def sinkhorn(logits, iterations, mask=None):
    """ott's kernel-mode Sinkhorn, epsilon 1, per group: (G, S, E) -> plan."""
    logits = np.asarray(logits, np.float64)
    plans = []
    for g, group in enumerate(logits):
        a = np.ones(group.shape[0]) if mask is None else np.asarray(mask[g], np.float64)
        b = np.full(group.shape[1], a.sum() / group.shape[1])
        kernel = np.exp(group) * a[:, None]
        u, v = np.ones_like(a), np.ones_like(b)
        for _ in range(iterations):
            ku = kernel.T @ u
            v = b / np.where(ku > 0, ku, 1)
            kv = kernel @ v
            u = a / np.where(kv > 0, kv, 1)
        if iterations == 0:
            plans.append(kernel)
            continue
        with np.errstate(divide="ignore"):
            plans.append(np.exp(np.log(u)[:, None] + np.log(v)[None, :] + group))
    return np.stack(plans)


def simplex_projection(x, k=None):
    """Euclidean projection of a vector onto the simplex, at most k non-zeros
    (the k largest, lower index first among ties)."""
    x = np.asarray(x, np.float64)
    k = len(x) if k is None else min(k, len(x))
    order = np.argsort(-x, kind="stable")[:k]
    v = x[order]
    cumulative = np.cumsum(v)
    ranks = np.arange(1, k + 1)
    support = max(int(np.sum(1 / ranks + v - cumulative / ranks > 0)), 1)
    tau = (cumulative[support - 1] - 1) / support
    out = np.zeros_like(x)
    out[order] = np.maximum(v - tau, 0)
    return out


def semi_dual(similarity, row_mass, column_mass, k, max_steps=20, lr=1e-2, tol=1e-3):
    """jaxopt's semi-dual by OptaxSolver(adam): one problem, similarity (N, M)
    by columns; returns the (N, M) plan and the number of Adam steps taken."""
    similarity = np.asarray(similarity, np.float64)
    b = np.asarray(column_mass, np.float64)
    safe = np.where(b > 0, b, 1.0)
    alpha = np.zeros(similarity.shape[1])
    m1, m2 = np.zeros_like(alpha), np.zeros_like(alpha)

    def columns(alpha):
        return (
            np.stack([simplex_projection((alpha + row) / s, k) for row, s in zip(similarity, safe)])
            * b[:, None]
        )

    steps = 0
    while True:
        steps += 1
        grad = columns(alpha).sum(0) - row_mass
        m1 = 0.9 * m1 + 0.1 * grad
        m2 = 0.999 * m2 + 0.001 * grad**2
        alpha = alpha - lr * (m1 / (1 - 0.9**steps)) / (np.sqrt(m2 / (1 - 0.999**steps)) + 1e-8)
        if not (np.linalg.norm(grad) > tol and steps < max_steps):
            break
    return columns(alpha), steps


def sparse_expert_choice_plan(gates, k, mask=None, **solver):
    """(G, S, E) plan of vmoe's k-sparse expert-choice router (k = capacity;
    None: the dense projection router)."""
    plans = []
    for g, group in enumerate(np.asarray(gates, np.float64)):
        a = np.ones(group.shape[0]) if mask is None else np.asarray(mask[g], np.float64)
        similarity = np.where(a[None, :] > 0, group.T, -1e9)
        plan, _ = semi_dual(similarity, a, np.full(group.shape[1], a.sum() / group.shape[1]), k, **solver)
        plans.append(plan.T)
    return np.stack(plans)


def sparse_token_choice_plan(gates, k, mask=None, **solver):
    """(G, S, E) plan of vmoe's k-sparse token-choice router."""
    plans = []
    for g, group in enumerate(np.asarray(gates, np.float64)):
        a = np.ones(group.shape[0]) if mask is None else np.asarray(mask[g], np.float64)
        plan, _ = semi_dual(group, np.full(group.shape[1], a.sum() / group.shape[1]), a, k, **solver)
        plans.append(plan)
    return np.stack(plans)


def pav_top_k_mask(x, k, regularization):
    """The relaxed top-k mask (p = 2) by the authors' route: sort, isotonic
    regression (pool adjacent violators) of s - l * w, y = (s - v) / l, unsort."""
    x = np.asarray(x, np.float64)
    order = np.argsort(-x, kind="stable")
    s = x[order]
    z = s - regularization * (np.arange(len(s)) < k)
    blocks = []  # [start, end, sum, count]
    for i, value in enumerate(z):
        blocks.append([i, i + 1, value, 1])
        while len(blocks) > 1 and blocks[-2][2] / blocks[-2][3] <= blocks[-1][2] / blocks[-1][3]:
            last = blocks.pop()
            blocks[-1][1], blocks[-1][2], blocks[-1][3] = (
                last[1],
                blocks[-1][2] + last[2],
                blocks[-1][3] + last[3],
            )
    v = np.empty_like(s)
    for start, end, total, count in blocks:
        v[start:end] = total / count
    y = np.empty_like(x)
    y[order] = (s - v) / regularization
    return y
