"""Hyperparameter learning by implicit differentiation: ``python -m applications.hyperopt
[clean|distill|l2|compare]`` (data hyper-cleaning by default; see :mod:`applications.hyperopt.cli`)."""
