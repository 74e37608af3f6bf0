"""The demo's image-caption set (``mmdit-demo-data``), built from images installed packages ship.

For the demo, tests and benchmarks only: never imported by the loader, sharding, precompute or
any training/eval code (the import-linter contracts in pyproject.toml enforce it).
"""
