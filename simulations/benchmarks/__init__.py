"""fedsft's performance benchmark suite: ``python -m simulations.benchmarks``.

Each benchmark is one module with a ``run(bench: Bench) -> dict`` function that measures
two or more setups side by side in the same invocation and returns the raw numbers,
a table and its targets; ``__main__`` writes them to ``results/<name>.json`` and
``RESULTS.md``. Shared helpers (sizes per mode, fedsft runs through the Simulation
Engine, in-process training, machine details) are in ``harness.py``.
"""
