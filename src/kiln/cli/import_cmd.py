"""`kiln import model.mar [DIR] [--trusted]`: a TorchServe model archive as a Kiln project.

A .mar is a zip that torch-model-archiver fills with MAR-INF/MANIFEST.json, the
handler, the serialized file, the model file and extra files, all at its root.
They are unpacked (zip-slip and size checked, kiln.storage.archives) into
DIR/model/, and DIR/kiln.yaml gets a `torchserve:` block whose handler, model
folder and version come from the manifest; a `configFile` becomes
model-config.yaml beside the handler and a `requirementsFile` the project's
requirements.txt, so both keep working as they did under TorchServe.

A serialized .pt/.pth that is neither TorchScript nor a plain state_dict is a full
pickle, which runs code when loaded: it is refused unless `--trusted`, which then
also writes `trusted: true` in kiln.yaml. The check reads the pickle's opcodes and
never unpickles anything.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import zipfile
from pathlib import Path
from pickletools import genops
from typing import Annotated, Any

import typer

from kiln.cli.common import console, fail
from kiln.storage.archives import unpack_zip
from kiln.storage.errors import UnsafeArchive

MANIFEST = "MAR-INF/MANIFEST.json"
PICKLED_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".ckpt")
# What a state_dict's pickle refers to (torch.save(model.state_dict())), as torch's own
# weights_only loader allows: tensors, storages, ordered dicts. Anything else is code.
_SAFE_GLOBALS = re.compile(
    r"^(collections\.OrderedDict|torch\._utils\._rebuild_\w+|torch\.\w*Storage"
    r"|torch\.storage\.\w+|torch\.(device|Size|dtype|float\w*|int\w*|bfloat16|bool)"
    r"|builtins\.(set|frozenset|tuple|list|dict)|_codecs\.encode)$"
)


def import_mar(
    mar: Annotated[Path, typer.Argument(help="The .mar archive (torch-model-archiver's).")],
    directory: Annotated[
        Path | None, typer.Argument(help="Project folder to create (default: ./<model name>).")
    ] = None,
    trusted: Annotated[
        bool,
        typer.Option(
            "--trusted",
            help="Accept full-pickle weights (they run code when loaded); kiln.yaml then "
            "says trusted: true.",
        ),
    ] = False,
) -> None:
    """Turn a TorchServe .mar into a Kiln project that `kiln serve DIR` serves."""
    if not mar.is_file():
        fail(f"{mar} does not exist; pass the path of a .mar file")
    try:
        with zipfile.ZipFile(mar) as zf:
            manifest = json.loads(zf.read(MANIFEST))
    except (zipfile.BadZipFile, KeyError, ValueError) as exc:
        fail(
            f"{mar} is not a TorchServe model archive ({exc}); a .mar is a zip with "
            f"{MANIFEST}, as torch-model-archiver writes it"
        )
    model = manifest.get("model") or {}
    name = _api_name(str(model.get("modelName") or mar.stem))
    target = directory or Path(name)
    if target.exists() and any(target.iterdir()):
        fail(f"{target} exists and is not empty; name a new folder: kiln import {mar} NEW_DIR")
    handler = str(model.get("handler") or "")
    handler_file = handler.split(":", 1)[0]
    if not handler_file.endswith(".py"):
        fail(
            f"the archive's handler is {handler!r}, one of TorchServe's built-in handlers; "
            "Kiln runs handler files: write one (e.g. a BaseHandler subclass in handler.py) "
            "and re-archive, or add it to the imported project's model/ folder"
        )
    with tempfile.TemporaryDirectory(prefix="kiln-import-") as scratch:
        staging = Path(scratch) / "model"
        try:
            unpack_zip(mar, staging)
        except UnsafeArchive as exc:
            fail(f"{mar} cannot be imported: {exc}")
        serialized = model.get("serializedFile")
        if serialized:
            weights = staging / str(serialized)
            if not weights.is_file():
                fail(f"the manifest names serializedFile {serialized!r}, which the archive lacks")
            problem = pickle_problem(weights)
            if problem and not trusted:
                fail(
                    f"{serialized} {problem}: a full pickle runs code when it is loaded. "
                    f"Import it only if you trust its source: kiln import {mar} --trusted "
                    "(kiln.yaml then says trusted: true), or re-archive the model as "
                    "TorchScript or as a state_dict with --model-file"
                )
        target.mkdir(parents=True, exist_ok=True)
        shutil.copytree(staging, target / "model", dirs_exist_ok=True)
    _extras(model, target)
    (target / "kiln.yaml").write_text(_kiln_yaml(name, model, handler, trusted), encoding="utf-8")
    console.print(f"Imported [bold]{mar.name}[/] into {target}/ (API '{name}')")
    console.print(f"Serve it: kiln serve {target}")


def _api_name(model_name: str) -> str:
    """TorchServe names allow `_` (`squeezenet1_1`); Kiln API names are DNS labels."""
    label = re.sub(r"[^a-z0-9-]+", "-", model_name.lower()).strip("-")[:63].strip("-")
    return label or "model"


def _extras(model: dict[str, Any], target: Path) -> None:
    """configFile -> model-config.yaml beside the handler; requirementsFile -> requirements.txt."""
    folder = target / "model"
    config = model.get("configFile")
    if config and (folder / config).is_file() and config != "model-config.yaml":
        shutil.copyfile(folder / config, folder / "model-config.yaml")
    requirements = model.get("requirementsFile")
    if requirements and (folder / requirements).is_file():
        shutil.copyfile(folder / requirements, target / "requirements.txt")


def _kiln_yaml(name: str, model: dict[str, Any], handler: str, trusted: bool) -> str:
    lines = ["- kind: api", f"  name: {name}"]
    version = model.get("modelVersion")
    if version and re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]*$", str(version)):
        lines.append(f'  version: "{version}"')
    handler_ref = json.dumps("model/" + handler)
    lines += ["  torchserve:", f"    handler: {handler_ref}", "    model: model/"]
    if trusted:
        lines.append("    trusted: true  # full-pickle weights allowed by kiln import --trusted")
    return "# Imported from a TorchServe .mar by `kiln import`.\n" + "\n".join(lines) + "\n"


def pickle_problem(path: Path) -> str | None:
    """Why `path` is a full pickle (a sentence), or None for TorchScript, a state_dict or
    a file that is no pickle at all. Reads opcodes only; nothing is unpickled."""
    if path.suffix.lower() not in PICKLED_SUFFIXES:
        return None
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            if any(n.endswith("/constants.pkl") for n in names) and any(
                "/code/" in n for n in names
            ):
                return None  # TorchScript: loaded by torch.jit.load, no pickled code
            data = next((n for n in names if n.endswith("/data.pkl") or n == "data.pkl"), None)
            if data is None:
                return None
            blob = zf.read(data)
    except zipfile.BadZipFile:
        blob = path.read_bytes()
    unsafe = sorted({g for g in _globals(blob) if not _SAFE_GLOBALS.match(g)})
    if not unsafe:
        return None
    shown = ", ".join(unsafe[:3]) + (" ..." if len(unsafe) > 3 else "")
    return f"is a full pickle (it refers to {shown})"


def _globals(blob: bytes) -> list[str]:
    """The `module.name` globals a pickle would import (GLOBAL and STACK_GLOBAL)."""
    found: list[str] = []
    strings: list[str] = []
    try:
        for opcode, arg, _ in genops(blob):
            if opcode.name == "GLOBAL" and isinstance(arg, str):
                found.append(arg.replace(" ", "."))
            elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
            elif isinstance(arg, str) and "UNICODE" in opcode.name:
                strings.append(arg)
    except Exception:  # noqa: BLE001 - not a pickle we can read: treat as unsafe
        found.append("<unreadable pickle>")
    return found
