"""Synthetic CT-RATE / OmniAbnorm-CT data in the real on-disk layouts (``ctprep demo-data``)."""

from ctprep.synth.ctrate import FAULT_KINDS, write_ctrate
from ctprep.synth.omniabnorm import OMNI_FAULT_KINDS, write_omniabnorm

__all__ = ["FAULT_KINDS", "OMNI_FAULT_KINDS", "write_ctrate", "write_omniabnorm"]
