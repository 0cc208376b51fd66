"""Plumbing every package shares: errors, the config schema, files a kill cannot leave half written, run
directories (checkpoint pointer, RNG state, metrics), parquet tables and worker pools (Ray is confined to
`core.pools` and `core.ray_reaper`).

Imports nothing from the other packages, and nothing heavy here: `base_model` installs the torchvision shim
of `core.compat` when it is imported.
"""
