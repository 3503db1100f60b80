"""Backend-specific tools that are not MoE ops.

`keras_vmoe/ops/` is the one place for backend-specific code. Its top level
holds the MoE ops (a `keras.ops` reference and measured per-backend
overrides); this subpackage the other things only a backend can do:

- `compiled_steps`: the compiled XLA program of a train or predict step (JAX);
- `input_gradients`: a model's loss and its gradient with respect to the
  input (all three; for adversarial attacks);
- `torch_onnx`: ONNX export through torch.export (PyTorch);
- `values`: whether a tensor holds values now, or is being traced (all three).
"""
