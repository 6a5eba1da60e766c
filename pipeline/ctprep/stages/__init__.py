"""Pipeline stages, one module per stage: scan, resample, regions, text, pack.

``STAGES`` is the fixed list of them, in pipeline order; ``get_stage`` /
``list_stages`` (defined in ``ctprep.stages.base``, where the runner imports
them from) read it. A new stage is a module here plus its line in ``STAGES``.
"""

from ctprep.stages import pack, regions, resample, scan, text
from ctprep.stages.base import STAGE_ORDER, StageSpec, get_stage, list_stages

STAGES: dict[str, StageSpec] = {
    spec.name: spec
    for spec in (scan.SCAN, resample.run_resample.spec, regions.run_regions.spec, text.run_text.spec, pack.run_pack.spec)
}
if tuple(STAGES) != STAGE_ORDER:  # a stage module declared the wrong name
    raise RuntimeError(f"ctprep.stages.STAGES {tuple(STAGES)} does not follow STAGE_ORDER {STAGE_ORDER}")

__all__ = ["STAGES", "STAGE_ORDER", "get_stage", "list_stages"]
