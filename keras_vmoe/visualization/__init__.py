"""Pictures of what a model does (routing maps, routing plans, LIMoE expert modalities),
line charts of evaluations, and reliability diagrams."""

from keras_vmoe.visualization.expert_modality import draw_expert_modality
from keras_vmoe.visualization.line_chart import draw_line_chart
from keras_vmoe.visualization.reliability_diagram import draw_reliability_diagram
from keras_vmoe.visualization.routing_map import draw_routing_map
from keras_vmoe.visualization.routing_plans import dispatched_pairs
from keras_vmoe.visualization.routing_plans import draw_routing_plans
