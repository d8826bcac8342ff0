"""A deep-equilibrium classifier trained through ``bilevel.FixedPoint`` (``python -m applications.deq``)."""
