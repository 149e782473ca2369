"""Reversible changes to a model's UNet: forward hooks and weight masks that are always undone.

Mitigators that act on the model (neuron deactivation, pruning) and detectors that read attention
(``attention_processors``) patch through these context managers only, so the model is restored exactly
on exit, also when the body raises.
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


_ABSENT = object()


@contextmanager
def attention_processors(unet: torch.nn.Module, processors: dict[str, object]) -> Iterator[None]:
    """Give the named attention modules other processors for the body; the originals come back on exit.

    Keys are module names (``"down_blocks.1.attentions.0.transformer_blocks.0.attn2"``; the
    ``".processor"`` suffix of ``unet.attn_processors`` keys is accepted too). Only the named modules are
    touched. On exit every touched module gets back the very same processor object and its submodule
    table as it was (a processor that is an ``nn.Module`` lives in ``_modules``; diffusers' ``set_processor``
    pops it), so ``state_digest`` and ``attn_processors`` are unchanged, also when the body raises.
    """
    modules = dict(unet.named_modules())
    saved: list[tuple[torch.nn.Module, object, dict]] = []
    try:
        for key, proc in processors.items():
            name = key[: -len(".processor")] if key.endswith(".processor") else key
            m = modules.get(name)
            if m is None or not hasattr(m, "set_processor"):
                raise KeyError(f"{name!r} is not an attention module of this UNet")
            saved.append((m, m.__dict__.get("processor", _ABSENT), dict(m._modules)))
            m.set_processor(proc)
        yield
    finally:
        for m, proc, subs in reversed(saved):
            m._modules.clear()
            m._modules.update(subs)
            if proc is _ABSENT:
                m.__dict__.pop("processor", None)
            else:
                m.__dict__["processor"] = proc
