"""CellStrat Hub users bring their project folder and client code unchanged (seed 003).

The seed's quickstart `src/main.py` and its client code run verbatim: against `kiln
serve` of the Hub folder as `hub init` lays it out (hub_config.json, no kiln.yaml), and
against `kiln server` where a user deploys it with `kiln deploy` and calls
`/{user}/{api}` with `x-api-key`. `from hub import hub_handler` comes from Kiln's shim,
which must never shadow a real package called `hub`. `kiln init --template hub` writes
the Hub's layout, and `kiln serve` answers from it as created.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from daemon import Daemon
from support import KILN, KilnServer, write

from kiln.compat import shims
from kiln.config import ConfigError, load_project

# The quickstart's src/main.py, verbatim from seed 003 ("Integrate").
QUICKSTART_MAIN = """\
import os
from hub import hub_handler
import torch # +++ ADDED THIS +++
from transformers import AutoTokenizer, AutoModelForSequenceClassification # +++ ADDED THIS +++

MODEL_DIR = os.getenv("MODEL_DIR")

model = AutoModelForSequenceClassification.from_pretrained(MODEL_DIR) # +++ ADDED THIS +++
tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR) # +++ ADDED THIS +++

@hub_handler
def inference_handler(inputs, _):
    \'\'\'The main inference function which gets triggered when the API is invoked\'\'\'
    # +++ ADDED THIS +++

    # preprocess
    inputs = tokenizer(inputs, padding=True, return_tensors="pt")

    # make prediction
    with torch.inference_mode():
        logits = model(**inputs).logits
        probs = torch.softmax(logits, dim=-1)

    # post process outputs
    output = []
    for prob in probs:
        preds = [(model.config.id2label[i], round(p.item() * 100, 2)) for i, p in enumerate(prob)]
        preds = sorted(preds, key=lambda x: x[1], reverse=True)
        output.append(preds)

    return output
"""

# The quickstart's requirements.txt, verbatim.
QUICKSTART_REQUIREMENTS = "torch\ntransformers\n"

# The quickstart's client code ("Invocation"), verbatim: the three blocks in order.
# As the seed says, the key, the username and the server's address are replaced.
CLIENT = """\
import os
import json
import requests
import base64

# Paste your key and username here
API_KEY = "YOUR API KEY"
USERNAME = "YOUR USERNAME"
API_NAME = "sentiment-analyser"

# The API endpoint for your Hub API project
endpoint = f"https://api.cellstrathub.com/{USERNAME}/{API_NAME}"

headers = {
  "x-api-key": API_KEY,
  "Content-Type": "application/json"
}

requests.get(endpoint, headers=headers).json()

sample_inputs = ["Deployment with CellStrat Hub is so simple and quick!",
                 "I have been using CellStrat Workspace for a while now",
                 "I don't like that movie. It tried to do a lot of things at once."]

payload = sample_inputs[0]

# Send the POST request
response = requests.post(endpoint, headers=headers, data=json.dumps(payload)).json()

if response.get('statusCode') == 200:
    # Parse the output
    output = response['body']['output']
else:
    output = response

print(output)
"""

# What the seed says the client prints.
SEED_OUTPUT = "[[['Positive', 93.58], ['Neutral', 6.27], ['Negative', 0.15]]]"

# A tiny BERT classifier whose head ignores the text: zero weights and the log of the
# seed's probabilities as biases, so every sentence gets exactly the seed's answer.
BUILD_MODEL = """
import math, sys
from pathlib import Path
import torch
from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
words = ("deployment with cellstrat hub is so simple and quick i have been using workspace "
         "for a while now don t like that movie it tried to do lot of things at once").split()
vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *dict.fromkeys(words), "!", ".", "'"]
(out / "vocab.txt").write_text("\\n".join(vocab) + "\\n")
BertTokenizer(str(out / "vocab.txt")).save_pretrained(out)
torch.manual_seed(0)
labels = {0: "Positive", 1: "Neutral", 2: "Negative"}
config = BertConfig(
    vocab_size=len(vocab), hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
    intermediate_size=8, max_position_embeddings=64, num_labels=3,
    id2label=labels, label2id={v: k for k, v in labels.items()},
)
model = BertForSequenceClassification(config)
with torch.no_grad():
    model.classifier.weight.zero_()
    model.classifier.bias.copy_(torch.tensor([math.log(p) for p in (0.9358, 0.0627, 0.0015)]))
model.save_pretrained(out)
"""

TEMPLATE = Path(__file__).resolve().parents[1] / "src" / "kiln" / "cli" / "templates" / "hub"
HUB_LAYOUT = {
    "Dockerfile",
    "hub_config.json",
    "model/README.md",
    "src/main.py",
    "src/requirements.txt",
    "src/utils.py",
}


def needs_transformers() -> None:
    for name in ("torch", "transformers"):
        if importlib.util.find_spec(name) is None:
            pytest.skip(f"the quickstart's model needs {name}")


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The quickstart's Hub project folder: `hub init`'s layout with the seed's code."""
    needs_transformers()
    root = tmp_path_factory.mktemp("hub") / "sentiment-analyser"
    for rel in HUB_LAYOUT - {"model/README.md"}:
        write(root / rel, (TEMPLATE / rel).read_text().replace("{{name}}", root.name))
    write(root / "src" / "main.py", QUICKSTART_MAIN)
    write(root / "src" / "requirements.txt", QUICKSTART_REQUIREMENTS)
    built = subprocess.run(
        [sys.executable, "-c", BUILD_MODEL, str(root / "model")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr
    assert not (root / "kiln.yaml").exists()
    return root


def run_client(
    base: str, capsys: pytest.CaptureFixture[str], key: str = "", user: str = ""
) -> dict[str, Any]:
    """Run the seed's client code as its user would, and return its variables."""
    code = CLIENT.replace("YOUR API KEY", key).replace("YOUR USERNAME", user)
    address = "https://api.cellstrathub.com" + ("" if user else "/{USERNAME}")
    code = code.replace(address, base)  # `kiln serve` has no users: /{API_NAME}
    capsys.readouterr()
    namespace: dict[str, Any] = {}
    exec(compile(code, "seed_003_client.py", "exec"), namespace)
    namespace["printed"] = capsys.readouterr().out
    return namespace


def check_answers(ns: dict[str, Any]) -> None:
    import requests

    assert ns["printed"] == SEED_OUTPUT + "\n"
    assert ns["response"] == {
        "statusCode": 200,
        "body": {"output": [[["Positive", 93.58], ["Neutral", 6.27], ["Negative", 0.15]]]},
    }
    ping = requests.get(ns["endpoint"], headers=ns["headers"])
    assert ping.status_code == 200 and ping.json()["status"] == "ready"
    # All three sample sentences at once: one ranked list per sentence.
    many = requests.post(
        ns["endpoint"], headers=ns["headers"], data=json.dumps(ns["sample_inputs"])
    )
    assert many.json()["statusCode"] == 200
    assert (
        many.json()["body"]["output"]
        == [[["Positive", 93.58], ["Neutral", 6.27], ["Negative", 0.15]]] * 3
    )


@pytest.mark.timeout(400)
def test_quickstart_folder_serves_the_seed_client_with_kiln_serve(
    quickstart: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server = KilnServer(quickstart, tmp_path / "home")
    try:
        ns = run_client(server.url, capsys)
        check_answers(ns)
        assert ns["endpoint"] == f"{server.url}/sentiment-analyser"
        listed = server.client.get("/apis").json()
        (api,) = [a for a in listed["apis"] if a["name"] == "sentiment-analyser"]
        assert api["version"] == "0.0.1"
    finally:
        server.stop()


@pytest.mark.timeout(600)
def test_a_user_deploys_the_folder_and_the_seed_client_calls_it_with_a_key(
    quickstart: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    daemon = Daemon(tmp_path / "home")
    daemon.start()
    try:
        made = daemon.kiln("users", "create", "alice", "-o", "json")
        assert made.returncode == 0, made.stderr
        key = orjson.loads(made.stdout)["key"]
        deployed = daemon.kiln_env(
            {**daemon.env, "KILN_API_KEY": key}, "deploy", str(quickstart), timeout=400
        )
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        assert "/alice/sentiment-analyser" in deployed.stdout

        ns = run_client(daemon.url, capsys, key=key, user="alice")
        check_answers(ns)
        assert ns["endpoint"] == f"{daemon.url}/alice/sentiment-analyser"
        # Without the key the same call is refused.
        refused = httpx.post(ns["endpoint"], content=json.dumps("hi"))
        assert refused.status_code == 401
    finally:
        daemon.stop()


# --- the shim never hides a real `hub` ---------------------------------------------

WHICH = """
import hub


class Which:
    def predict(self, payload, context):
        return {"who": getattr(hub, "WHO", "kiln"), "file": hub.__file__,
                "hub_handler": hasattr(hub, "hub_handler")}
"""

# An unrelated distribution that happens to be called `hub` (as PyPI's is).
REAL_HUB = 'WHO = "the user\'s own hub"\n'


def test_a_real_hub_package_wins_over_the_shim(tmp_path: Path) -> None:
    project = tmp_path / "proj"
    write(project / "src" / "which.py", WHICH)
    write(project / "vendor" / "hub" / "__init__.py", REAL_HUB)
    # A data folder named hub/ (no __init__.py) beside the handler: not a package.
    write(project / "src" / "hub" / "notes.txt", "not code\n")
    write(
        project / "kiln.yaml",
        "- kind: api\n  name: real\n  python_path: vendor\n"
        "  python: {handler: src/which.py:Which}\n"
        "- kind: api\n  name: shimmed\n  python: {handler: src/which.py:Which}\n",
    )
    server = KilnServer(project, tmp_path / "home")
    try:
        real = server.client.post("/real", json={}).json()
        assert real == {
            "who": "the user's own hub",
            "file": str((project / "vendor" / "hub" / "__init__.py").resolve()),
            "hub_handler": False,
        }
        shimmed = server.client.post("/shimmed", json={}).json()
        assert shimmed["who"] == "kiln" and shimmed["hub_handler"] is True
        assert Path(shimmed["file"]) == shims.SHIM_ROOT / "hub" / "__init__.py"
    finally:
        server.stop()


def test_the_finder_serves_shim_packages_and_their_submodules_last(tmp_path: Path) -> None:
    """A new shim is a folder: its submodules import, and a real package of its name wins."""
    root = tmp_path / "shims"
    write(root / "kiln_probe_shim" / "__init__.py", "WHO = 'shim'\n")
    write(root / "kiln_probe_shim" / "sub" / "__init__.py", "")
    write(root / "kiln_probe_shim" / "sub" / "mod.py", "from .. import WHO\nVALUE = WHO * 2\n")
    write(root / "kiln_probe_real" / "__init__.py", "WHO = 'shim'\n")
    write(root / "not_a_package" / "data.txt", "")
    real = tmp_path / "site"
    write(real / "kiln_probe_real" / "__init__.py", "WHO = 'real'\n")
    finder = shims.ShimFinder(root)
    assert finder.names == {"kiln_probe_shim", "kiln_probe_real"}
    sys.meta_path.insert(0, finder)
    sys.path.append(str(real))
    try:
        from kiln_probe_shim.sub import mod  # type: ignore[import-not-found]

        assert mod.VALUE == "shimshim"
        import kiln_probe_real  # type: ignore[import-not-found]

        assert kiln_probe_real.WHO == "real"
    finally:
        sys.meta_path.remove(finder)
        sys.path.remove(str(real))
        for name in [
            n for n in sys.modules if n.startswith(("kiln_probe_shim", "kiln_probe_real"))
        ]:
            del sys.modules[name]


# --- hub_config.json as the project's config ----------------------------------------


def test_hub_config_is_read_when_there_is_no_kiln_yaml(tmp_path: Path) -> None:
    project = tmp_path / "p"
    write(project / "hub_config.json", '{\n  "name": "digits",\n  "version": "2"\n}\n')
    write(project / "src" / "main.py", "")
    (project / "model").mkdir()
    loaded = load_project(project)
    (api,) = loaded.apis
    assert loaded.config_file == project / "hub_config.json"
    assert loaded.deployment_name == "digits"
    assert (api.name, api.version, api.endpoint) == ("digits", "2", "/digits")
    assert api.python is not None and api.python.handler == str(project / "src" / "main.py")
    assert api.python.model == str(project / "model")
    assert api.response_envelope == "hub"
    # A kiln.yaml beside it wins: that is how a Hub project changes any of the above.
    write(project / "kiln.yaml", "- kind: api\n  name: other\n  python: {handler: src/main.py}\n")
    assert [a.name for a in load_project(project).apis] == ["other"]


@pytest.mark.parametrize(
    "text,line,message",
    [
        ('{\n  "name": "x",\n  "version": \n}\n', 4, "hub_config.json is not valid JSON"),
        ('{\n  "version": "1"\n}\n', None, "hub_config.json has no project name"),
        ('{\n  "name": "Not A Name"\n}\n', 2, "api 'Not A Name'"),
        ('{\n  "name": "ok",\n  "version": "1/2"\n}\n', 3, "invalid version '1/2'"),
    ],
)
def test_hub_config_problems_name_the_file_and_line(
    tmp_path: Path, text: str, line: int | None, message: str
) -> None:
    write(tmp_path / "hub_config.json", text)
    write(tmp_path / "src" / "main.py", "")
    with pytest.raises(ConfigError) as info:
        load_project(tmp_path)
    (issue,) = info.value.issues
    assert issue.file == "hub_config.json"
    assert issue.line == line
    assert message in str(issue)


def test_a_hub_folder_without_main_py_says_which_file(tmp_path: Path) -> None:
    write(tmp_path / "hub_config.json", '{"name": "x"}')
    with pytest.raises(ConfigError) as info:
        load_project(tmp_path)
    assert "src/main.py" in str(info.value)


# --- kiln init --template hub -------------------------------------------------------


def test_kiln_init_hub_writes_the_hub_layout_and_kiln_serve_answers(tmp_path: Path) -> None:
    made = subprocess.run(
        [*KILN, "init", "my-hub-api", "--template", "hub"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert made.returncode == 0, made.stdout + made.stderr
    project = tmp_path / "my-hub-api"
    files = {p.relative_to(project).as_posix() for p in project.rglob("*") if p.is_file()}
    assert files == HUB_LAYOUT
    assert json.loads((project / "hub_config.json").read_text()) == {
        "name": "my-hub-api",
        "version": "0.0.1",
    }
    assert "from hub import hub_handler" in (project / "src" / "main.py").read_text()
    assert "COPY src/requirements.txt" in (project / "Dockerfile").read_text()

    server = KilnServer(project, tmp_path / "home")
    try:
        assert server.client.get("/my-hub-api").json()["status"] == "ready"
        echoed = server.client.post("/my-hub-api", json={"text": "hello"})
        assert echoed.status_code == 200
        assert echoed.json() == {"statusCode": 200, "body": {"output": {"text": "hello"}}}
    finally:
        server.stop()

    # src/ is importable: main.py uses the generated utils.py as Hub projects do.
    main = project / "src" / "main.py"
    main.write_text(
        main.read_text()
        .replace("from hub import hub_handler", "from hub import hub_handler\nimport utils")
        .replace("output = inputs", "output = utils.convert_base64_to_bytes(inputs).decode()")
    )
    server = KilnServer(project, tmp_path / "home2")
    try:
        encoded = "data:text/plain;base64," + base64.b64encode(b"from utils").decode()
        answer = server.client.post("/my-hub-api", json=encoded).json()
        assert answer == {"statusCode": 200, "body": {"output": "from utils"}}
    finally:
        server.stop()


def test_kiln_init_hub_refuses_a_name_that_cannot_be_a_url(tmp_path: Path) -> None:
    made = subprocess.run(
        [*KILN, "init", "My_Hub", "--template", "hub"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert made.returncode == 2
    assert "'my-hub'" in made.stdout + made.stderr
    assert not (tmp_path / "My_Hub").exists()
