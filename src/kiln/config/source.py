"""Reading kiln.yaml into plain data while remembering where every key was.

``yaml.safe_load`` throws line numbers away, and an error message without a
line number sends users hunting. So the file is composed into YAML nodes,
and the data is built from those nodes here, recording the line of every key
and list item by its path (``(0, "onnx", "model") -> 7``). The same walk
substitutes ``${VAR}`` / ``${VAR:-default}`` in string values (never in keys,
and after parsing, so a variable's value cannot inject YAML structure) and
spots duplicate keys, which PyYAML would otherwise silently overwrite.

Which variables a file may read is the caller's choice (``kiln.config.policy``);
on top of them, a resource's strings also read its own ``env:`` mapping and the
deployment's (``_Builder.declare_env``), whose values read only the caller's.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

Path_ = tuple[Any, ...]

_ENV_REF = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_STR_TAG = "tag:yaml.org,2002:str"
_NULL_TAG = "tag:yaml.org,2002:null"


@dataclass
class RawIssue:
    """A problem found while reading, before resources have names."""

    path: Path_
    line: int | None
    message: str
    fix: str
    variable: bool = False
    """An unset ``${VAR}`` (kept even where it caused other problems)."""


@dataclass
class Document:
    """The parsed file: data, key lines by path, and reading problems."""

    data: Any = None
    lines: dict[Path_, int] = field(default_factory=dict)
    issues: list[RawIssue] = field(default_factory=list)
    env_paths: set[Path_] = field(default_factory=set)


def substitute_env(
    text: str, env: Mapping[str, str], unset: str | None = None
) -> tuple[str, list[str]]:
    """Expand ``${VAR}`` and ``${VAR:-default}``; ``$${`` is a literal ``${``.

    Returns the new text and the names of variables that are unset and have no
    default, so the caller can report them all instead of stopping at the first.
    With ``unset`` given, such a reference is replaced by it instead of kept.
    """
    missing: list[str] = []

    def repl(m: re.Match[str]) -> str:
        if m.group(0) == "$${":
            return "${"
        name, default = m.group(1), m.group(2)
        if name in env:
            return env[name]
        if default is not None:
            return default
        missing.append(name)
        return m.group(0) if unset is None else unset

    return _ENV_REF.sub(repl, text), missing


Unset = Callable[[str], tuple[str, str]]
"""unset(name) -> (message, fix) for a ``${name}`` that nothing sets."""


def _unset_local(name: str) -> tuple[str, str]:
    return (
        f"environment variable {name} is not set (used as ${{{name}}})",
        f"export {name}=... before running kiln, or give a default: ${{{name}:-value}}",
    )


def _is_env_value(path: Path_) -> bool:
    """A value inside a resource's ``env:`` mapping (``(0, "env", "NAME")``)."""
    return len(path) == 3 and isinstance(path[0], int) and path[1] == "env"


def _env_text(node: yaml.Node) -> str | None:
    """An ``env:`` value as written: text, never a YAML number or bool (``007`` stays)."""
    if not isinstance(node, yaml.ScalarNode):
        return None
    return "" if node.tag == _NULL_TAG else str(node.value)


class _Builder:
    def __init__(self, loader: yaml.SafeLoader, env: Mapping[str, str], unset: Unset) -> None:
        self.loader = loader
        self.env = env
        self.unset = unset
        self.layers: dict[int, Mapping[str, str]] = {}
        self.doc = Document()

    def declare_env(self, root: yaml.Node) -> None:
        """``${VAR}`` in a resource also reads the ``env:`` mappings that reach its workers:
        its own over the deployment's, over the base variables. The ``env:`` values
        themselves read only the base variables."""
        if not isinstance(root, yaml.SequenceNode):
            return
        declared: dict[int, dict[str, str]] = {}
        deployment: dict[str, str] | None = None
        for i, item in enumerate(root.value):
            if not isinstance(item, yaml.MappingNode):
                continue
            kind, mapping = None, None
            for key_node, value_node in item.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    continue
                if key_node.value == "kind" and isinstance(value_node, yaml.ScalarNode):
                    kind = value_node.value
                elif key_node.value == "env" and isinstance(value_node, yaml.MappingNode):
                    mapping = value_node
            values: dict[str, str] = {}
            for key_node, value_node in mapping.value if mapping is not None else []:
                text = _env_text(value_node)
                if isinstance(key_node, yaml.ScalarNode) and text is not None:
                    new, missing = substitute_env(text, self.env)
                    if not missing:
                        values[str(key_node.value)] = new
            declared[i] = values
            if kind == "deployment" and deployment is None:
                deployment = values
        for i, values in declared.items():
            self.layers[i] = {**self.env, **(deployment or {}), **values}

    def variables(self, path: Path_) -> Mapping[str, str]:
        if not path or _is_env_value(path) or not isinstance(path[0], int):
            return self.env
        return self.layers.get(path[0], self.env)

    def build(self, node: yaml.Node, path: Path_) -> Any:
        if isinstance(node, yaml.MappingNode):
            return self._mapping(node, path)
        if isinstance(node, yaml.SequenceNode):
            out = []
            for i, item in enumerate(node.value):
                self.doc.lines[path + (i,)] = item.start_mark.line + 1
                out.append(self.build(item, path + (i,)))
            return out
        if not isinstance(node, yaml.ScalarNode):  # composed YAML has no other kind
            raise TypeError(f"unexpected YAML node {node!r}")
        return self._scalar(node, path)

    def _mapping(self, node: yaml.MappingNode, path: Path_) -> dict[Any, Any]:
        self.loader.flatten_mapping(node)
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = self.loader.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, list | dict):
                self.doc.issues.append(
                    RawIssue(path, line, "a key must be a plain name", "write `name: value`")
                )
                continue
            if key in out:
                self.doc.issues.append(
                    RawIssue(
                        path + (key,),
                        line,
                        f"duplicate key '{key}' (first at line {self.doc.lines[path + (key,)]})",
                        "keep only one; YAML would silently use the last one",
                    )
                )
                continue
            self.doc.lines[path + (key,)] = line
            out[key] = self.build(value_node, path + (key,))
        return out

    def _scalar(self, node: yaml.ScalarNode, path: Path_) -> Any:
        value = self.loader.construct_object(node, deep=True)
        if _is_env_value(path):
            value = _env_text(node)
        elif node.tag != _STR_TAG:
            return value
        if not isinstance(value, str) or "${" not in value:
            return value
        new, missing = substitute_env(value, self.variables(path))
        for name in missing:
            self.doc.env_paths.add(path)
            message, fix = self.unset(name)
            self.doc.issues.append(
                RawIssue(path, node.start_mark.line + 1, message, fix, variable=True)
            )
        if _is_env_value(path):
            return new
        if node.style is None and new != value:
            # An unquoted `${N}` should read like the literal would: `2` is an int.
            try:
                typed = yaml.safe_load(new)
            except yaml.YAMLError:
                return new
            if not isinstance(typed, dict | list) and typed is not None:
                return typed
        return new


def read_yaml(text: str, env: Mapping[str, str], unset: Unset | None = None) -> Document:
    """Parse ``text`` into a :class:`Document`; syntax errors become issues.

    ``env`` feeds ``${VAR}`` (with each resource's ``env:`` layered over it);
    ``unset(name)`` words the problem for a variable that nothing sets."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        detail = " ".join(p for p in (exc.context, exc.problem) if p)
        doc = Document()
        doc.issues.append(
            RawIssue(
                (),
                mark.line + 1 if mark else None,
                f"YAML syntax error: {detail}",
                "check the indentation and the ':' after each key near this line "
                "(values containing ': ' or starting with '{', '[', '*', '&' need quotes)",
            )
        )
        return doc
    except yaml.YAMLError as exc:
        doc = Document()
        doc.issues.append(RawIssue((), None, f"YAML error: {exc}", "fix the YAML syntax"))
        return doc
    finally:
        loader.dispose()
    if node is None:
        doc = Document()
        doc.issues.append(
            RawIssue(
                (),
                None,
                "the config file is empty",
                "add at least one resource, e.g. `- kind: api` with a `name` and a runtime "
                "block such as `onnx: {model: model.onnx}` (see docs/config.md)",
            )
        )
        return doc
    builder = _Builder(yaml.SafeLoader(""), env, unset or _unset_local)
    builder.declare_env(node)
    builder.doc.data = builder.build(node, ())
    return builder.doc


def read_file(path: Path) -> str:
    """Read the config text; a BOM or odd encoding is the user's, not a crash."""
    return path.read_text(encoding="utf-8-sig")
