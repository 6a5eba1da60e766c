"""Dataset layouts (one module per layout) and their registry.

``get_source(name)``, ``detect_source(root)`` and ``available_sources()`` import
the known source modules on first use (see ``ctprep.sources.base.SOURCE_MODULES``).
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

__all__ = [
    "CaseInput",
    "LoadedCase",
    "Source",
    "available_sources",
    "detect_source",
    "get_source",
    "register_source",
]
