"""``python -m ctprep_train.eval``: see ``ctprep_train.eval.run``."""

from ctprep_train.eval.run import main

main()
