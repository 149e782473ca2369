"""Reversible changes to a model's UNet: forward hooks and weight masks that are always undone.

Mitigators that act on the model (neuron deactivation, pruning) patch through these context
managers only, so the model is restored exactly on exit, also when the body raises.
``state_digest`` is the test oracle: parameters, buffers, hooks and attention processors.
"""
from __future__ import annotations

import hashlib
from contextlib import contextmanager
from typing import Callable, Iterator

import torch


def state_digest(module: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer (names, dtypes, bytes) plus hooks and processors."""
    h = hashlib.sha256()
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        h.update(str(t.requires_grad).encode())
    for name, m in module.named_modules():
        hooks = (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
        if any(hooks):
            h.update(f"{name}:{hooks}".encode())
    procs = getattr(module, "attn_processors", None)
    if procs:
        for k, p in sorted(procs.items()):
            h.update(f"{k}:{type(p).__name__}:{id(p)}".encode())
    return h.hexdigest()


@contextmanager
def forward_hooks(hooks: dict[torch.nn.Module, Callable]) -> Iterator[None]:
    """Register ``module -> fn(module, inputs, output) -> output`` forward hooks; removed on exit."""
    handles = []
    try:
        for m, fn in hooks.items():
            handles.append(m.register_forward_hook(fn))
        yield
    finally:
        for hd in handles:
            hd.remove()


@contextmanager
def masked_weights(masks: dict[torch.nn.Parameter, torch.Tensor]) -> Iterator[None]:
    """Zero ``param[mask]`` in place for the body; the original values are put back on exit."""
    saved: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for p, mask in masks.items():
                if mask.shape != p.shape or mask.dtype != torch.bool:
                    raise ValueError(f"mask must be bool with the parameter's shape {tuple(p.shape)}, "
                                     f"got {mask.dtype} {tuple(mask.shape)}")
                saved.append((p, p.detach().clone()))
                p.masked_fill_(mask.to(p.device), 0)
        yield
    finally:
        with torch.no_grad():
            for p, orig in saved:
                p.copy_(orig)
