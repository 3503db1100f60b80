"""
Title: Routers: what each one computes, how to pick one, and the router study in miniature
Author: keras_vmoe contributors
Date created: 2026/12/03
Last modified: 2026/12/03
Description: The seven routers of keras_vmoe on the same tokens, the plans they make, and how they compare on CIFAR-10.
Accelerator: None
"""

"""
## Introduction

In a sparse Mixture-of-Experts layer the **router** decides which expert
processes which token. "Routers in Vision Mixture of Experts: An Empirical
Study" (Liu, Puigcerver, Blondel et al.) compares six of them on the same
V-MoE; keras_vmoe has all six, plus the sparse, differentiable top-k of
"Fast, Differentiable and Sparse Top-k" (Sander, Puigcerver, Djolonga, Peyré,
Blondel). Every one is a `keras_vmoe.layers.Router` with one contract:

```python
plan, metrics = router(tokens, training=False, token_mask=None)  # tokens (G, S, D)
```

`plan` is a `RoutingPlan` (index tables: which token sits in which expert
slot, with what combine weight) for the sparse routers and a
`SoftRoutingPlan` (weights) for Soft MoE; `metrics` are per routing group,
`auxiliary_loss` among them. Routers compute *scores* and *combine gates*
(`router.route_gates`); two pure functions turn them into plans, as vmoe's
dispatchers do: `top_k_experts_plan` (each token takes its top K experts, all
top-1 choices served before any top-2, a full expert drops the choice) and
`top_c_tokens_plan` (each expert takes its top C tokens).

| name | family | scores | combine weight | paper |
|---|---|---|---|---|
| `"token_choice"` | token choice | softmax gates | softmax gate | V-MoE |
| `"expert_choice"` | expert choice | softmax gates | softmax gate | Expert Choice |
| `SoftMoE` | soft | slot logits | softmax over slots | Soft MoE |
| `"sinkhorn_token_choice"` | token choice | Sinkhorn plan of the logits | softmax gate | router study |
| `"sinkhorn_expert_choice"` | expert choice | Sinkhorn plan of the logits | softmax gate | router study |
| `"sparse_expert_choice"` | expert choice | C-sparse OT plan of the softmax | softmax gate | Sparsity-Constrained OT |
| `"sparse_token_choice"` | token choice | K-sparse OT plan of the softmax | softmax gate | Sparsity-Constrained OT |
| `"sparse_top_k"` | token choice | relaxed top-K mask x softmax | the same | Sparse Top-k |

Any of the names goes to `SparseMoE(router=...)`, `VMoEBackbone(router=...)`
and `keras_vmoe.upcycle(..., router=...)`; vmoe checkpoints whose config names
one of vmoe's router classes convert with `load_vmoe_checkpoint`.
"""

"""
## Setup

`KERAS_VMOE_GUIDE_FAST=1` (the test suite's mode) only shortens nothing here:
this guide trains nothing, it reads the study's results from
`benchmarks/results/`.
"""

import os
import pathlib

import keras
import numpy as np

from keras_vmoe.layers import ROUTERS
from keras_vmoe.layers import SoftRouter
from keras_vmoe.visualization import dispatched_pairs
from keras_vmoe.visualization import draw_routing_plans

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
OUTPUT = pathlib.Path(os.environ.get("KERAS_VMOE_GUIDE_OUTPUT", "/tmp/keras_vmoe_guides"))
print(f"Keras {keras.__version__}, backend {keras.backend.backend()}")
print("registered routers:", sorted(ROUTERS))

"""
## The same tokens, seven routers

One routing group of 16 tokens of width 8, four experts, and one gating
kernel shared by every router (scaled so that the gates are peaky, as a
trained router's are). Token choice takes K = 1 expert per token with capacity
factor 1 (4 slots per expert); expert choice gives each expert C = 4 tokens:
the same compute.
"""

rng = np.random.RandomState(0)
tokens = rng.randn(1, 16, 8).astype("float32")
kernel = 2.0 * rng.randn(8, 4).astype("float32")

routers = {}
for name, cls in sorted(ROUTERS.items()):
    options = {} if "expert_choice" in name else {"num_selected_experts": 1}
    router = cls(4, noise_std=0.0, capacity_factor=1.0, **options)
    router.build(tokens.shape)
    router.kernel.assign(kernel)
    routers[name] = router

for name, router in routers.items():
    plan, metrics = router(tokens)
    pairs = dispatched_pairs(plan)[0]
    print(
        f"{name:>24}: tokens per expert {pairs.sum(0).tolist()}, "
        f"dropped tokens {int((pairs.sum(1) == 0).sum())}, auxiliary loss "
        f"{float(keras.ops.convert_to_numpy(metrics['auxiliary_loss'])[0]):.4f}"
    )

"""
Token choice with softmax gates sends each token to its favourite expert and
drops what a full expert cannot take: with peaky gates several tokens crowd
one expert. Expert choice fills every expert exactly, but some tokens get two
experts and some none. The Sinkhorn routers first balance the gates into a
transport plan (every token mass 1, every expert mass 16 / 4), so the
choices spread over the experts before any capacity is applied; the
sparsity-constrained plan does the same with at most C tokens per expert.

Here is what the softmax and the Sinkhorn token-choice routers see and
decide for the same tokens (shade: the score; dot: a dispatched pair):
"""

panels = {}
for name in ("token_choice", "sinkhorn_token_choice", "expert_choice", "sparse_expert_choice"):
    router = routers[name]
    scores, _, _ = router.route_gates(tokens, False, None)
    plan, _ = router(tokens)
    panels[name] = (keras.ops.convert_to_numpy(scores)[0], dispatched_pairs(plan)[0])
picture = draw_routing_plans(panels, title="the same 16 tokens, four routers (shade: score; dot: dispatched)")
OUTPUT.mkdir(parents=True, exist_ok=True)
picture.save(OUTPUT / "router_plans.png")
print("picture written to", OUTPUT / "router_plans.png")

"""
![routing plans](../docs/router_plans.png)

The Sinkhorn plan (second panel) is balanced: every column holds about the
same mass, where the softmax gates (first panel) pile onto one or two experts.

Soft MoE does not choose at all: every slot is a weighted average of every
token, and every token a weighted average of every slot.
"""

soft = SoftRouter(4, slots_per_expert=1)
soft.build(tokens.shape)
soft_plan, soft_metrics = soft(tokens)
dispatch = keras.ops.convert_to_numpy(soft_plan.dispatch_weights)[0, :, :, 0]
print(
    "Soft MoE dispatch weights: each expert's slot sums its weights over the tokens:",
    np.round(dispatch.sum(0), 4).tolist(),
)

"""
## Padding

Every router takes a `token_mask` (False for padding, e.g. a packed
sequence): padding takes no slot, gets no combine weight and is left out of
the losses and metrics.
"""

mask = np.ones((1, 16), bool)
mask[0, 12:] = False
for name in ("token_choice", "sinkhorn_expert_choice", "sparse_expert_choice"):
    plan, _ = routers[name](tokens, token_mask=mask)
    pairs = dispatched_pairs(plan)[0]
    assert not pairs[12:].any()
    print(f"{name:>24} with 4 padding tokens: tokens per expert {pairs.sum(0).tolist()}")

"""
## How to pick one

- **Soft MoE** when nothing may be dropped and a token's output may depend on
  the other tokens of its group (images: yes; autoregressive text: no). The
  study and the Soft MoE paper find it the strongest at equal compute.
- **Expert choice** (softmax, Sinkhorn or sparsity-constrained) when every
  expert should do the same work: nothing is wasted on empty slots, but a
  token may get no expert. The study finds expert choice above token choice.
- **Token choice** when each token must get (at least a chance at) its own
  experts, e.g. with Batch Priority Routing at inference; the Sinkhorn and
  sparse top-k variants balance or relax the choice without an auxiliary
  loss doing all the work.
- The OT routers' solvers cost a few more passes over (tokens x experts)
  per layer: `python benchmarks/moe_layer.py --parts routers` measures them
  against token choice (the README's speed section has the figures).

## The router study in miniature

`benchmarks/router_study.py` trains a dense ViT and one V-MoE per router on
CIFAR-10 with the bundled presets' recipe at equal per-token compute (on a
2-core CPU: 10,000 training images, 8 epochs, one seed, about two hours;
`--seeds 2` adds the spread between seeds, `--full` is the presets' 100-epoch
run for an accelerator). Its results:
"""

record = REPO_ROOT / "benchmarks" / "results" / "router_study-cpu2.md"
if record.is_file():
    print(record.read_text())
else:
    print(f"no results at {record}: run python benchmarks/router_study.py")

"""
![router study](../benchmarks/results/router_study-cpu2.png)

What the paper found, on JFT and ImageNet with ViT-B/16-sized models: expert
choice routers above token choice ones, and Soft MoE above all sparse
routers. How this small CPU-sized study agrees and where it does not is in
the README. At this scale (two MoE layers of a 4-block ViT, 8 epochs, one
seed) the sparse routers lie within half a point of each other, less than one
seed can tell apart (expert choice above token choice, as in the paper, but
by less than that); Soft MoE ends last, below the dense ViT: the paper's
ranking of Soft MoE first does not hold at this budget.
"""
