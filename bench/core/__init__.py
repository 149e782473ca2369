"""The model and the loops: the diffusion-model adapter (``model``), THE sampling loop (``sampling``),
training (``train``), reversible UNet patching (``patching``), hardware helpers (``hardware``), the CLIP
tokenizer, a random SD-1.5-shaped model for speed runs, and atomic file writes.

May import: nothing else of the package except ``bench.errors`` (the lowest engine layer).
"""
