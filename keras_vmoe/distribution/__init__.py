"""Expert parallelism and data parallelism with `keras.distribution`.

`get_layout_map(device_mesh)` gives the `keras.distribution.LayoutMap` that
shards the experts of every MoE layer over an "expert" mesh axis, and the
layout of their dispatched slots that makes dispatch and combine all-to-all
exchanges; `keras.distribution.ModelParallel` does the rest (GSPMD on JAX).
`collective_report` / `step_collectives` show what the compiled program
exchanges. Keras 3's distribution API runs on the JAX backend only.
"""

from keras_vmoe.distribution.collectives import CollectiveReport
from keras_vmoe.distribution.collectives import collective_report
from keras_vmoe.distribution.expert_exchange import ExpertExchange
from keras_vmoe.distribution.layout_map import get_layout_map
from keras_vmoe.distribution.layout_map import validate_layout_map
from keras_vmoe.distribution.step_collectives import step_collectives
