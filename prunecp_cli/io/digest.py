"""A hash of a model's weights, independent of the file that holds them.

A file's sha256 cannot be written into the file itself, so a record that must stay with one set of
weights (the Learn-then-Test ``risk_control`` record in a model's metadata) carries this digest of
the state dict instead: re-pruning or fine-tuning changes the weights, and so the digest, and the
record no longer matches the model it sits in.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn


def weights_sha256(model: nn.Module) -> str:
    """Hex sha256 over every state-dict entry: its name, dtype, shape and raw bytes, in name order."""
    digest = hashlib.sha256()
    state = model.state_dict()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(f"\0{tensor.dtype}\0{list(tensor.shape)}\0".encode())
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
