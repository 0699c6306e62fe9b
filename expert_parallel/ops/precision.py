"""Autocast helpers: which dtype the expert GEMMs run in, and switching autocast off where the math
must keep its own dtype (router logits, gates and combine weights in router_dtype)."""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor


def autocast_on(device: torch.device) -> bool:
    """Whether autocast is enabled for this device's type (False where autocast has no such type)."""
    try:
        return torch.is_autocast_enabled(device.type)
    except RuntimeError:  # e.g. "meta"
        return False


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the expert GEMMs run in: autocast's lower precision when autocast is on for x's
    device (fp32 master weights with bf16 compute), else x's own dtype."""
    return torch.get_autocast_dtype(x.device.type) if autocast_on(x.device) else x.dtype


def autocast_off(device: torch.device) -> contextlib.AbstractContextManager[object]:
    """A context with autocast off for ``device``'s type (a no-op where it is not on)."""
    if autocast_on(device):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()
