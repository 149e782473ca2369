"""Studies: experiments that combine a world with methods and the engine (the organism's ground truth, the
explainer and NeMo studies, the fine-tuning mitigation protocol, the organism comparison, cluster
tightness, FB-Mem thresholds, the attention-detector check, the speed and FAISS-scale benchmarks).

May import: everything (``bench``, ``baselines``, ``tasks``). Nothing but ``bench/cli.py`` imports a study.
"""
