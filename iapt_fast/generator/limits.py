"""Limits of the generator's backends, defined once (imported by the kernels' launch policy too)."""

# tl.dot needs every dimension >= 16 on NVIDIA GPUs, so the kernels keep the T soft tokens in
# one register tile padded to 16: the Triton backend runs T <= 16 (design.md §4).
MAX_SOFT_TOKENS = 16
