"""Shared test settings."""

import torch

# Tiny tensors on a 2-core machine: one intra-op thread is faster and steadier.
torch.set_num_threads(1)
