"""Fitting a run to the hardware: memory-aware batch size and optional ``torch.compile`` of the UNet.

``fit_batch_size(model, requested)`` is the largest number of samples per UNet call (each sample is
a conditional and an unconditional row) that is at most ``requested`` and fits in the free memory of
the model's CUDA device. It measures, once per UNet and input shape, the peak memory of a forward of
2 and of 4 rows and extrapolates linearly (activation memory grows with rows; weights do not). On
the CPU it returns ``requested`` unchanged: host memory is not probed, so pick the batch size there.
Batch size never changes a result (every operation of the sampling loop is per row), only speed.

``compile_unet(model)`` compiles the UNet in place with ``torch.compile`` (GPU; on the CPU the compile itself takes
minutes and gains little on small models). It returns the model for chaining.
"""
from __future__ import annotations

import weakref

import torch

SAFETY = 0.8                      # use at most this share of the free device memory
_PROBES: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


def rows_that_fit(free_bytes: int, bytes_per_row: float, *, safety: float = SAFETY) -> int:
    """How many UNet rows fit in ``safety`` x ``free_bytes`` when each row needs ``bytes_per_row``."""
    if free_bytes < 0 or bytes_per_row < 0:
        raise ValueError(f"free_bytes={free_bytes} and bytes_per_row={bytes_per_row} must be >= 0")
    if not 0 < safety <= 1:
        raise ValueError(f"safety={safety} must be in (0, 1]")
    if bytes_per_row == 0:
        return 2 ** 31
    return int(safety * free_bytes // bytes_per_row)


def samples_that_fit(requested: int, free_bytes: int, bytes_per_row: float, *, safety: float = SAFETY,
                     where: str = "the device") -> int:
    """min(requested, samples that fit); a sample is 2 rows (cond + uncond). Raises if none fits."""
    if requested < 1:
        raise ValueError(f"batch_size must be >= 1, got {requested}")
    fit = rows_that_fit(free_bytes, bytes_per_row, safety=safety) // 2
    if fit < 1:
        raise MemoryError(f"not even one sample (2 UNet rows, {2 * bytes_per_row / 2**20:.0f} MiB) fits in "
                          f"{safety:.0%} of the {free_bytes / 2**20:.0f} MiB free on {where}; free memory "
                          "(other processes, cached tensors) or use a smaller model / lower precision")
    return min(requested, fit)


def bytes_per_row(model) -> float:
    """Peak CUDA memory per UNet row, measured once per (UNet, latent shape, text length) and cached."""
    key = (tuple(model.latent_shape), int(model.max_length))
    cache = _PROBES.setdefault(model.unet, {})
    if key not in cache:
        dev, dt = model.device, model.dtype
        hidden = model.unet.config.cross_attention_dim
        peaks = []
        with torch.inference_mode():
            for rows in (2, 4):
                x = torch.zeros((rows, *model.latent_shape), device=dev, dtype=dt)
                e = torch.zeros((rows, model.max_length, hidden), device=dev, dtype=dt)
                t = torch.tensor(999, device=dev)
                torch.cuda.synchronize(dev)
                torch.cuda.reset_peak_memory_stats(dev)
                base = torch.cuda.memory_allocated(dev)
                model.unet(x, t, encoder_hidden_states=e, return_dict=False)
                torch.cuda.synchronize(dev)
                peaks.append(torch.cuda.max_memory_allocated(dev) - base)
                del x, e
        cache[key] = max(peaks[1] - peaks[0], 1) / 2
    return cache[key]


def fit_batch_size(model, requested: int, *, safety: float = SAFETY) -> int:
    """Samples per UNet call: ``requested`` on the CPU; on CUDA at most what fits in free memory."""
    if model.device.type != "cuda":
        return int(requested)
    free, _total = torch.cuda.mem_get_info(model.device)
    return samples_that_fit(int(requested), free, bytes_per_row(model), safety=safety, where=str(model.device))


def compile_unet(model, *, mode: str | None = None):
    """Compile ``model.unet`` in place (``nn.Module.compile``): same object, weights and module names,
    so hooks and patches still find ``attn2.to_v`` etc.; ``mode`` is torch.compile's (None = default)."""
    if getattr(model.unet, "_compiled_call_impl", None) is None:
        model.unet.compile(mode=mode)
    return model
