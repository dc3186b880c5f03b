"""Training, kept apart from inference: no inference module imports it (the CLI only registers its subcommand).

- train.py: trains the bundled demo model (sdengine/data/demo-digits) on scikit-learn's digits;
  the `sdengine train demo-digits` subcommand. Needs the `train` extra (pip install "sdengine[train]").
"""
