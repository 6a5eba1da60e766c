"""Dataset layouts (one module per layout) and their fixed list, ``SOURCES``.

``get_source(name)``, ``detect_source(root)`` and ``available_sources()`` (defined
in ``ctprep.sources.base``) read ``SOURCES``.
"""

from ctprep.sources.base import (
    CaseInput,
    LoadedCase,
    Source,
    available_sources,
    detect_source,
    get_source,
    register_source,
)
from ctprep.sources.ctrate import CtRateSource
from ctprep.sources.omniabnorm import OmniAbnormSource

# name -> Source class; the names are what manifests, shards and ``--source`` carry.
SOURCES: dict[str, type[Source]] = {
    CtRateSource.name: CtRateSource,
    OmniAbnormSource.name: OmniAbnormSource,
}

__all__ = [
    "SOURCES",
    "CaseInput",
    "CtRateSource",
    "LoadedCase",
    "OmniAbnormSource",
    "Source",
    "available_sources",
    "detect_source",
    "get_source",
    "register_source",
]
