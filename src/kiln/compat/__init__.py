"""Compatibility with the platforms Kiln's users come from, so their code runs unchanged.

`shims.py` serves import names those platforms' code expects (`from hub import
hub_handler`) inside workers, from `shim_packages/`, whenever the user has no real
package of that name.
"""
