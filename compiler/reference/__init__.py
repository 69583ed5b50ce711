"""Reference implementations of the attnforge ops (sparse, linear, KV-cache attention): what the
PyTorch backend runs, and the oracle every other lowering is checked against.
"""
