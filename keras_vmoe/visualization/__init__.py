"""Pictures of what a model does (routing maps)."""

from keras_vmoe.visualization.routing_map import draw_routing_map
