"""How Kiln passes arguments to user code: the one rule set.

Every entry point a user writes (a handler class's constructor, `predict`,
`explain`, a torch module's constructor, a Cortex predictor, the seed-era
`pre_inference`/`post_inference` hooks) receives what it declares, by these
rules, decided once at load time:

- constructors (`keyword_args`): parameters are matched by name against what
  Kiln offers (config, model_dir, model_path, metadata, a runtime client...);
  the first parameter may take a named value whatever it is called (`first`);
  a required parameter Kiln cannot supply is a load error naming it.
- calls (`adapt_call`): the same names, plus the request's own values; the
  payload under any of its customary names; unnamed parameters take the
  payload, then the context, by position.
- seed-era hooks (`positional_hook`): by count only, because Cortex's hooks
  name their second argument `metadata` while passing the signature in it.

A leaf module (it imports nothing of Kiln), so runtimes and handlers share it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

PAYLOAD_NAMES = frozenset(
    {"payload", "inputs", "input", "sample", "data", "request", "body", "event"}
)
_REQUEST_NAMES = ("context", "query_params", "headers")


def _parameters(func: Callable[..., Any]) -> list[inspect.Parameter] | None:
    try:
        return list(inspect.signature(func).parameters.values())
    except (TypeError, ValueError):  # builtins and C types may not expose a signature
        return None


def keyword_args(
    target: Callable[..., Any],
    values: dict[str, Any],
    *,
    first: str | None = None,
    hint: str = "",
) -> dict[str, Any]:
    """The keyword arguments to call `target` (a class: its constructor) with."""
    params = _parameters(target)
    if params is None:
        return {}
    kwargs: dict[str, Any] = {}
    for index, param in enumerate(params):
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if param.name in values:
            kwargs[param.name] = values[param.name]
        elif index == 0 and first is not None:
            kwargs[param.name] = values[first]
        elif param.default is param.empty:
            name = getattr(target, "__qualname__", repr(target))
            raise TypeError(
                f"{name}() asks for '{param.name}', which Kiln cannot supply"
                + (f"; {hint}" if hint else f"; it can pass {', '.join(sorted(values))}")
            )
    return kwargs


def adapt_call(func: Callable[..., Any], values: dict[str, Any]) -> Callable[[dict[str, Any]], Any]:
    """Build `call(request_values)` that passes `func` the arguments it declares.

    Parameters are matched by name (payload/inputs/sample, context, query_params,
    headers, and the load-time `values`: metadata, config, batch_id, ...); the first
    unnamed one gets the payload and the second the context, as in
    `inference_handler(inputs, _)`.
    """
    params = [
        p
        for p in (_parameters(func) or [])
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    order: list[str] = []
    positional = ["payload", "context"]
    for index, param in enumerate(params):
        if param.name in PAYLOAD_NAMES:
            order.append("payload")
        elif param.name in values or param.name in _REQUEST_NAMES:
            order.append(param.name)
        elif index < len(positional):
            order.append(positional[index])
        elif param.default is not param.empty:
            break
        else:
            raise TypeError(
                f"{func.__qualname__}() asks for '{param.name}', which Kiln cannot supply; "
                f"use (payload, context)"
            )

    def call(request_values: dict[str, Any]) -> Any:
        merged = {**values, **request_values}
        return func(*(merged.get(name) for name in order))

    return call


def positional_hook(func: Callable[..., Any], *extra: Any) -> Callable[[Any], Any]:
    """`func(value, *extra[:n])` where n is how many more required positional parameters
    `func` declares: the seed-era hooks' `(sample)`, `(sample, signature)` and
    `(sample, signature, metadata)` forms."""
    required = [
        p
        for p in (_parameters(func) or [])
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    ]
    bound = extra[: max(0, len(required) - 1)]
    return lambda value: func(value, *bound)
