"""Launcher path of the trainer: ``deepspeed trainer/train.py --config configs/train/demo.yaml ...``.

The code is ``ctprep_train.train`` (``trainer/ctprep_train/train.py``); this file only keeps the
launch command short and stable. ``python -m ctprep_train.train`` runs the same ``main``.
"""

from ctprep_train.train import main

if __name__ == "__main__":
    main()
