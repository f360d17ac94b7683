"""The continual-learning experiment (spec section 8): plan, runner, report; `python -m sdft_jax.continual`."""
