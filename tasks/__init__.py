"""Worlds: prompt sets (``promptsets``), MemWorld and its drawing, the organism's construction, loaders and
task (``organism``, ``organism_task``, ``oracle``, ``organism_clip``), its copy criterion (``copies``), the
fine-tuning world and the MemWorld segmenter.

May import: the engine (``bench``). Never ``baselines/`` (methods) nor ``tasks.studies``; the experiments
that combine a world with methods live in ``tasks/studies``.
"""
