"""ctprep: offline CT preprocessing into self-describing WebDataset shards.

Stages (one module each in ``ctprep.stages``): scan -> resample -> regions ->
text -> pack. Dataset layouts are read by ``ctprep.sources``; the synthetic
generator that writes those layouts lives in ``ctprep.synth``.
"""

__version__ = "0.1.0"
