"""Applications built on bilevel."""
