"""Downloading a checkpoint from the Hub, against a real local HTTP server standing in for huggingface.co.

huggingface_hub reads HF_ENDPOINT and HF_HOME once, when `huggingface_hub.constants` is imported, so every
download runs in a fresh `python` subprocess that inherits the environment the test set up with monkeypatch.
"""

import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import gguf

from convert.hub import looks_like_repo_id
from tests.conftest import run_lva
from tests.hub_server import HubServer

ROOT = Path(__file__).resolve().parents[1]

REPO = "meta-llama/Tiny-Vision"
WEIGHTS = "model-00001-of-00002.safetensors"
NEEDED = {
    "config.json",
    "generation_config.json",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.json",
    WEIGHTS,
    "model-00002-of-00002.safetensors",
    "model.safetensors.index.json",
    "LICENSE.txt",
    "USE_POLICY.md",
    "README.md",
}
# original/ holds Meta's own format; the .safetensors one matches an allowed pattern but lives in a sub-folder.
NOT_NEEDED = {
    ".gitattributes",
    "pytorch_model.bin",
    "original/consolidated.pth",
    "original/params.json",
    "original/consolidated.safetensors",
}

# Calls the code under test and reports on stdout as JSON; a ConvertError is an answer, anything else a crash.
DOWNLOAD_SCRIPT = """
import json, sys
from convert.errors import ConvertError
from convert.hub import download_checkpoint
try:
    print(json.dumps({"path": str(download_checkpoint(*sys.argv[1:]))}))
except ConvertError as error:
    print(json.dumps({"error": str(error)}))
"""


@dataclass
class Outcome:
    path: Path | None
    error: str | None


def download(repo_id: str, *revision: str) -> Outcome:
    """Run `download_checkpoint(repo_id, *revision)` in a new interpreter with the current environment."""
    command = [sys.executable, "-c", DOWNLOAD_SCRIPT, repo_id, *revision]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    return Outcome(Path(answer["path"]) if "path" in answer else None, answer.get("error"))


@pytest.fixture(autouse=True)
def hub_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An empty HF home, no token, no proxy, no telemetry, no Xet; returns the HF cache directory."""
    for name in [
        "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE",
        "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY",
        "http_proxy", "https_proxy", "all_proxy",
    ]:  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    return tmp_path / "hf-home" / "hub"


@pytest.fixture
def tiny_repo(tmp_path: Path) -> Path:
    """A checkpoint directory laid out like meta-llama/Llama-3.2-11B-Vision-Instruct, with tiny files."""
    root = tmp_path / "tiny-repo"
    contents = {
        "config.json": json.dumps({"model_type": "mllama", "architectures": ["MllamaForConditionalGeneration"]}),
        "model.safetensors.index.json": json.dumps(
            {"weight_map": {"a": WEIGHTS, "b": "model-00002-of-00002.safetensors"}}
        ),
        "README.md": "---\nlicense: llama3.2\n---\n# Tiny\n",
    }
    for name in NEEDED | NOT_NEEDED:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if name in contents:
            path.write_text(contents[name])
        else:  # arbitrary bytes: downloads are checked byte for byte
            path.write_bytes(os.urandom(2_000))
    return root


def files_under(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in directory.rglob("*") if p.is_file()}


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def test_downloads_only_the_needed_files_into_the_hf_cache(
    tiny_repo: Path, hub_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with HubServer({REPO: tiny_repo}) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        outcome = download(REPO)

    assert outcome.error is None
    assert outcome.path == hub_env / "models--meta-llama--Tiny-Vision" / "snapshots" / server.commit(REPO)
    expected = {name: data for name, data in files_under(tiny_repo).items() if name in NEEDED}
    assert files_under(outcome.path) == expected
    assert sorted(server.downloads(REPO)) == sorted(NEEDED)
    assert not [r for r in server.requests if "/original" in r.path]
    assert all(r.authorization is None for r in server.requests)  # nobody logged in


def test_interrupted_transfer_resumes_with_a_range_request(
    tiny_repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # huggingface_hub writes what it received in 10 MiB chunks and resumes from there after a dropped
    # connection (after a 1 s pause), so the file must outgrow one chunk and be cut after it.
    chunk = 10 * 1024 * 1024
    (tiny_repo / WEIGHTS).write_bytes(os.urandom(chunk + 4096))
    with HubServer({REPO: tiny_repo}) as server:
        server.cut_next_download(REPO, WEIGHTS, after_bytes=chunk + 100)
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        outcome = download(REPO)

    assert outcome.error is None and outcome.path is not None
    assert (outcome.path / WEIGHTS).read_bytes() == (tiny_repo / WEIGHTS).read_bytes()
    weight_gets = [r for r in server.requests if r.method == "GET" and r.path.endswith(WEIGHTS)]
    assert [r.range for r in weight_gets] == [None, f"bytes={chunk}-"]


def test_second_download_fetches_only_what_is_missing(tiny_repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with HubServer({REPO: tiny_repo}) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        first = download(REPO)
        assert first.path is not None
        lost = first.path / WEIGHTS
        lost.resolve().unlink()  # the blob in the cache...
        lost.unlink()  # ...and the snapshot's link to it
        server.requests.clear()
        second = download(REPO)

    assert second.error is None and second.path == first.path
    assert server.downloads(REPO) == [WEIGHTS]
    assert (second.path / WEIGHTS).read_bytes() == (tiny_repo / WEIGHTS).read_bytes()


@pytest.mark.parametrize("token", [None, "hf_test_token"])
def test_gated_repo_asks_to_accept_the_license_and_log_in(
    tiny_repo: Path, monkeypatch: pytest.MonkeyPatch, token: str | None
) -> None:
    if token is not None:
        monkeypatch.setenv("HF_TOKEN", token)
    with HubServer({"meta-llama/Gated": tiny_repo}, gated={"meta-llama/Gated"}) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        outcome = download("meta-llama/Gated")

    assert outcome.path is None and outcome.error is not None
    assert "gated" in outcome.error
    assert "accept its license on https://huggingface.co/meta-llama/Gated" in outcome.error
    assert "hf auth login" in outcome.error and "HF_TOKEN" in outcome.error
    assert "\n" not in outcome.error
    assert server.downloads("meta-llama/Gated") == []
    # The token is huggingface_hub's to find (here HF_TOKEN) and goes with every request.
    assert {r.authorization for r in server.requests} == {f"Bearer {token}" if token else None}


def test_unknown_repo_says_it_was_not_found(tiny_repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with HubServer({REPO: tiny_repo}) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        outcome = download("nobody/No-Such-Model")

    assert outcome.error is not None
    assert "nobody/No-Such-Model was not found" in outcome.error
    assert "check the id" in outcome.error and "private" in outcome.error
    assert [r.path for r in server.requests] == ["/api/models/nobody/No-Such-Model/revision/main"]


def test_unknown_revision_says_so(tiny_repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with HubServer({REPO: tiny_repo}) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        outcome = download(REPO, "v9")

    assert outcome.error == f"revision 'v9' was not found in {REPO}: check the branch, tag or commit"


def test_other_hub_errors_report_the_http_status(tiny_repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with HubServer({}, failing={"acme/Broken": 500}) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        outcome = download("acme/Broken")

    assert outcome.error is not None
    assert "HTTP 500" in outcome.error and "acme/Broken" in outcome.error
    assert "\n" not in outcome.error


def test_unreachable_hub_suggests_a_local_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", closed_port_url())
    outcome = download(REPO)

    assert outcome.error is not None
    assert "could not reach the Hugging Face Hub" in outcome.error
    assert "local directory" in outcome.error


def test_unreachable_hub_falls_back_to_a_complete_cached_copy(
    tiny_repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with HubServer({REPO: tiny_repo}) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        first = download(REPO)
    monkeypatch.setenv("HF_ENDPOINT", closed_port_url())
    second = download(REPO)

    assert first.path is not None
    assert second.error is None and second.path == first.path


def test_offline_mode_without_a_cached_copy_names_hf_hub_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", closed_port_url())
    outcome = download(REPO)

    assert outcome.error is not None and "HF_HUB_OFFLINE is set" in outcome.error


def test_looks_like_repo_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a" / "b").mkdir(parents=True)

    assert looks_like_repo_id("meta-llama/Llama-3.2-11B-Vision-Instruct")
    assert looks_like_repo_id("owner/name.v2_final")
    assert not looks_like_repo_id("a/b")  # an existing local directory wins
    assert not looks_like_repo_id("./x")
    assert not looks_like_repo_id("../x")
    assert not looks_like_repo_id("/abs/path")
    assert not looks_like_repo_id(str(tmp_path / "a" / "b"))
    assert not looks_like_repo_id("a/b/c")
    assert not looks_like_repo_id("just-a-name")
    assert not looks_like_repo_id("bad name/x")


def test_lva_convert_downloads_a_repo_id_and_converts_it_into_the_store(
    checkpoint_256: Path, lva_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with HubServer({"meta-llama/Tiny-256-Vision": checkpoint_256}) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        result = run_lva("convert", "meta-llama/Tiny-256-Vision", "--quant", "Q8_0")
    assert result.returncode == 0, result.stderr
    models = lva_home / "models"
    assert sorted(p.name for p in models.iterdir()) == [
        "Tiny-256-Vision-text-Q8_0.gguf", "Tiny-256-Vision-vision-Q8_0.gguf"]
    fields = gguf.GGUFReader(models / "Tiny-256-Vision-text-Q8_0.gguf").fields
    assert fields["general.source.repo_url"].contents() == "https://huggingface.co/meta-llama/Tiny-256-Vision"

    listing = run_lva("models")
    assert listing.returncode == 0
    assert "Tiny-256-Vision" in listing.stdout and "Q8_0" in listing.stdout and "text + vision" in listing.stdout


def test_lva_convert_of_a_gated_repo_is_one_line(tiny_repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with HubServer({"meta-llama/Gated": tiny_repo}, gated={"meta-llama/Gated"}) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        result = run_lva("convert", "meta-llama/Gated")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("lva: error: ")
    assert "gated" in result.stderr and "hf auth login" in result.stderr and "Traceback" not in result.stderr
