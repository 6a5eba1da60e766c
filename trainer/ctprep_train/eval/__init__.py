"""Evaluation of an exported encoder on one split of the shards.

    python -m ctprep_train.eval --encoder runs/NAME/encoder --shards shards/ --split valid --out runs/NAME/eval

* ``run``: the command (``EvalConfig``, ``evaluate``, ``main``): retrieval, zero-shot
  classification and CoT alignment, written to ``eval.json`` and ``report.md``;
* ``data``: every sample of a split once, in index order, read and verified by the training
  reader (``ctprep_train.data``);
* ``metrics``: the protocols on plain embeddings (the trainer's validation uses
  ``metrics.retrieval_metrics`` too);
* ``attention_maps``: attention maps recomputed from forward hooks of a ``CTCLIP``;
* ``pictures``: the PNG figures (matplotlib, Agg).

Nothing is imported here, so ``ctprep_train.eval.metrics`` does not pull in matplotlib.
"""
