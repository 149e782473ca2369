"""``none``: the identity mitigator, the reference point of every trade-off plot.

The mitigator contract itself (``Mitigator``, ``GenSpec``) is the engine's: ``bench.contracts``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from bench.contracts import Mitigator


@dataclass
class NoMitigation(Mitigator):
    name: ClassVar[str] = "none"
