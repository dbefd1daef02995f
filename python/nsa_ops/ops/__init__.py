"""Operator wrappers of nsa_ops: one module per operator (drop-in with torch_npu's signature, Pythonic entry
point, autograd registration). Each module's ``register()`` (when it has one) is called once by the package."""
