"""`lva pull` against a local server in the registry's URL layout (tests/ollama_registry.py): real HTTP, real files."""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from convert.pipeline import convert
from tests.conftest import REPO_ROOT, run_lva
from tests.ollama_registry import OllamaRegistry
from tests.ollama_store import write_model, write_other_model
from tests.test_convert_bad_input import assert_one_line_error

CHECKPOINT = Path(__file__).parent / "fixtures" / "mllama" / "tiny-b" / "checkpoint"
TEXT = "llama3.2-vision-tiny-text-F16.gguf"
VISION = "llama3.2-vision-tiny-vision-F16.gguf"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """What the registry serves: llama3.2-vision:tiny (Ollama's v0.7.1 F16 file) and a text-only llama3.2:1b."""
    root = tmp_path_factory.mktemp("registry")
    blob = write_model(root, CHECKPOINT, "llama3.2-vision:tiny", "v0.7.1", "F16")
    text_only = convert(str(CHECKPOINT), tmp_path_factory.mktemp("llama"), quant="F16", progress=False).text
    write_other_model(root, "llama3.2:1b", text_only, ["llama"])
    return root, blob.name.replace("sha256-", "sha256:")


def pull(registry: OllamaRegistry, *args: str) -> subprocess.CompletedProcess:
    return run_lva("pull", *args, env={"LVA_OLLAMA_REGISTRY": registry.url})


def models(lva_home: Path) -> list[str]:
    folder = lva_home / "models"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def downloads(lva_home: Path) -> list[str]:
    folder = lva_home / "downloads"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_a_pull_imports_the_model_as_lva_import_would_and_keeps_no_download(store, lva_home: Path,
                                                                            tmp_path: Path) -> None:
    root, digest = store
    with OllamaRegistry(root) as registry:
        result = pull(registry, "llama3.2-vision:tiny")
    assert result.returncode == 0, result.stderr
    assert models(lva_home) == [TEXT, VISION]
    assert downloads(lva_home) == []
    assert [r.range for r in registry.blob_requests(digest)] == [None]
    local = run_lva("import", "llama3.2-vision:tiny", "--out", str(tmp_path), env={"OLLAMA_MODELS": str(root)})
    assert local.returncode == 0, local.stderr
    for name in (TEXT, VISION):                  # the same bytes as an import of Ollama's own store
        assert filecmp.cmp(lva_home / "models" / name, tmp_path / name, shallow=False), name


def test_a_cut_connection_resumes_with_a_range_request(store, lva_home: Path) -> None:
    root, digest = store
    with OllamaRegistry(root) as registry:
        registry.cut(digest, after_bytes=200_000)
        result = pull(registry, "llama3.2-vision:tiny")
    assert result.returncode == 0, result.stderr
    assert [r.range for r in registry.blob_requests(digest)] == [None, "bytes=200000-"]
    assert models(lva_home) == [TEXT, VISION]


def test_a_connection_cut_again_and_again_resumes_while_bytes_keep_coming(store, lva_home: Path) -> None:
    root, digest = store
    with OllamaRegistry(root) as registry:
        registry.cut(digest, after_bytes=300_000, times=3)
        result = pull(registry, "llama3.2-vision:tiny")
    assert result.returncode == 0, result.stderr
    assert [r.range for r in registry.blob_requests(digest)] == [None, "bytes=300000-", "bytes=600000-",
                                                                "bytes=900000-"]
    assert models(lva_home) == [TEXT, VISION] and downloads(lva_home) == []


def test_a_download_that_stops_keeps_its_part_and_the_next_run_resumes(store, lva_home: Path) -> None:
    root, digest = store
    with OllamaRegistry(root) as registry:
        registry.cut(digest, after_bytes=100_000, then_down=True)
        first = pull(registry, "llama3.2-vision:tiny")
    assert_one_line_error(first, "the download of llama3.2-vision:tiny stopped at 0.1 MB of 1.3 MB",
                          "run the same `lva pull` again to resume")
    partial = f"{digest.replace(':', '-')}-partial"
    assert partial in downloads(lva_home) and models(lva_home) == []
    assert (lva_home / "downloads" / partial).stat().st_size == 100_000

    with OllamaRegistry(root) as registry:
        second = pull(registry, "llama3.2-vision:tiny")
    assert second.returncode == 0, second.stderr
    assert [r.range for r in registry.blob_requests(digest)] == ["bytes=100000-"]
    assert models(lva_home) == [TEXT, VISION] and downloads(lva_home) == []


def test_a_corrupted_blob_is_refused_and_nothing_that_looks_complete_is_left(store, lva_home: Path) -> None:
    root, digest = store
    with OllamaRegistry(root) as registry:
        registry.corrupt(digest)
        result = pull(registry, "llama3.2-vision:tiny")
    assert_one_line_error(result, "failed its sha256 check", digest, "nothing was imported")
    assert models(lva_home) == []
    assert not [name for name in downloads(lva_home) if digest.split(":")[1] in name]


def test_an_unknown_tag_is_named(store, lva_home: Path) -> None:
    with OllamaRegistry(store[0]) as registry:
        result = pull(registry, "llama3.2-vision:99b")
    assert_one_line_error(result, "has no model llama3.2-vision:99b", "unknown model or tag")
    assert models(lva_home) == []


def test_a_model_that_is_not_mllama_is_refused_before_its_download(store, lva_home: Path) -> None:
    root, _ = store
    with OllamaRegistry(root) as registry:
        result = pull(registry, "llama3.2:1b")
    manifest = json.loads((root / "manifests" / "registry.ollama.ai" / "library" / "llama3.2" / "1b").read_text())
    assert_one_line_error(result, "llama3.2:1b is a text-only Llama", "llama3.2-vision")
    (model_layer,) = [layer for layer in manifest["layers"] if layer["mediaType"].endswith(".model")]
    assert registry.blob_requests(model_layer["digest"]) == []
    assert models(lva_home) == []


def test_a_closed_port_says_the_registry_cannot_be_reached(lva_home: Path) -> None:
    with socket.socket() as s:                    # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = run_lva("pull", "llama3.2-vision", env={"LVA_OLLAMA_REGISTRY": f"http://127.0.0.1:{port}"})
    assert_one_line_error(result, "cannot reach the Ollama registry", "LVA_OLLAMA_REGISTRY")
    assert models(lva_home) == []


def test_without_a_network_the_default_registry_cannot_be_reached(lva_home: Path) -> None:
    """The real default, registry.ollama.ai, from a private network namespace with no interfaces up."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rn", "true"]).returncode != 0:
        pytest.fail("unshare -rn is needed to run lva without a network (util-linux; .ci/run installs it)")
    result = subprocess.run(["unshare", "-rn", sys.executable, "-m", "assistant", "pull", "llama3.2-vision"],
                            capture_output=True, text=True, cwd=REPO_ROOT, timeout=120,
                            env={k: v for k, v in os.environ.items() if k != "LVA_OLLAMA_REGISTRY"})
    assert_one_line_error(result, "cannot reach the Ollama registry at https://registry.ollama.ai")
    assert models(lva_home) == []
