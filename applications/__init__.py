"""Applications built on bilevel.

* :mod:`applications.imaml` — few-shot meta-learning (iMAML, MAML, first-order MAML, Reptile);
* :mod:`applications.experiments` — experiments of the iMAML paper;
* :mod:`applications.hyperopt` — learned L2 strengths of a logistic regression;
* :mod:`applications.meta_gradients` — the MAML, first-order MAML and iMAML meta-gradients,
  written once for the first two.
"""
