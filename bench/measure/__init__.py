"""Measures: detection metrics and conformal calibration, image embedders, training-neighbour retrieval,
segmentation, MS-SSIM, FB-Mem, and the mitigation benchmark's copy scoring (``copyscore``; the world's
copy rule, CLIP and segmenter are handed in).

May import: ``bench.core``, ``bench.contracts``, ``bench.errors`` and ``bench.run.io`` (run records);
never ``baselines/`` or ``tasks/``.
"""
