"""Kiln's stand-ins for other platforms' import names, one package per folder.

Never imported under this name by workers: `kiln.compat.shims.ShimFinder` serves
`shim_packages/<name>/` as the top-level package `<name>` (only when no real
`<name>` is importable). The `__init__.py` here only makes setuptools ship them.
"""
