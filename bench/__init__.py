"""The engine: everything a benchmark run needs that knows no method and no world.

- ``bench.contracts``: the types every side shares (``PromptSet``, task, detector, mitigator, explainer,
  copy-judge and fine-tuner contracts, ``GenSpec``); methods and worlds implement them.
- ``bench.core``: the model adapter and the loops (sampling, training, patching, hardware).
- ``bench.measure``: metrics, calibration, embedders, retrieval, segmentation, MS-SSIM, FB-Mem, copy scoring.
- ``bench.run``: runners, run folders, shards, merge, screening, the config registry.
- ``bench.report``: leaderboards, plots, the HTML report.
- ``bench.errors``: user errors and exit codes (imports nothing).
- ``bench.cli``: the ``diffmem`` command, the face: the only module here that may import ``tasks/``.

Nothing in the engine imports ``baselines/`` (methods) or ``tasks/`` (worlds, studies); they are built from
config (``_target_``, ``bench.run.registry``). ``tests/test_layering.py`` checks it.
"""
