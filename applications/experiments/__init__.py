"""Experiments of the iMAML paper, reproduced with :mod:`bilevel`.

Rajeswaran, Finn, Kakade & Levine, *Meta-Learning with Implicit Gradients*, NeurIPS 2019.

* :mod:`applications.experiments.fig2a` — Figure 2a: accuracy of the meta-gradient of
  MAML (unrolled), first-order MAML and iMAML (implicit, CG in the backward) against the
  number of inner gradient steps and against compute, on a synthetic regression family
  whose exact meta-gradient is known in closed form.
* :mod:`applications.experiments.metagrad_quality` — how close iMAML's meta-gradient on
  the few-shot conv net is to the tight implicit gradient and to the derivative of the
  unrolled inner procedure, against Krylov steps, solver, λ and damping, with the extreme
  eigenvalues of the support Hessian that decide whether the implicit gradient is well posed.

Both compute their meta-gradients with :mod:`applications.meta_gradients`, the code the
few-shot application (:mod:`applications.imaml`) trains with.

Each experiment is a module with ``main(argv=None) -> int``, run as
``python -m applications.experiments.<name>``; results go to
``applications/experiments/results/`` (see ``docs/applications/experiments.md``).
"""
