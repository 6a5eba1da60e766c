"""Pipeline stages, one module per stage: scan, resample, regions, text, pack.

Each module registers its :class:`~ctprep.stages.base.StageSpec` on import;
``get_stage`` / ``list_stages`` import the modules lazily (see
``ctprep.stages.base.STAGE_MODULES``), so this package never needs to import
them eagerly (which would also make ``stages.base`` <-> stage modules circular).
"""

from ctprep.stages.base import STAGE_ORDER, get_stage, list_stages

__all__ = ["STAGE_ORDER", "get_stage", "list_stages"]
