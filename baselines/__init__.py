"""Methods: detectors, mitigators and explainers implementing the engine's contracts (``bench.contracts``).

May import: the engine (``bench``). Never ``tasks/`` (worlds): what a method needs from a world (the
fine-tuning protocol) is handed to it.
"""
