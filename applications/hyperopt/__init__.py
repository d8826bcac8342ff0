"""Hyperparameter learning by implicit differentiation: per-feature L2 strengths of a
multinomial logistic regression, learned by gradient descent on the validation loss
through an external (scipy) inner solver.  Run ``python -m applications.hyperopt``."""
