"""`lva ask`, `lva batch` and `lva history` as a user runs them: real processes, a real converted model."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from convert.pipeline import convert
from tests.conftest import REPO_ROOT, run_lva

FIXTURES = Path(__file__).parent / "fixtures"
IMAGES = FIXTURES / "images"


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    pair = convert(str(FIXTURES / "mllama" / "tiny-a" / "checkpoint"), tmp_path_factory.mktemp("models"),
                   quant="F32", name="tiny-a", progress=False)
    return str(pair.text)


def ask(model_path: str, *args: str, **kwargs) -> subprocess.CompletedProcess:
    return run_lva("ask", "--model", model_path, "--max-tokens", "8", "--temperature", "0", *args, **kwargs)


def test_ask_streams_the_answer_and_keeps_it_in_the_history(model_path: str) -> None:
    result = ask(model_path, "--image", str(IMAGES / "rgb_173x97.png"), "What is in this picture?")
    assert result.returncode == 0, result.stderr
    listed = run_lva("history", "list")
    assert listed.returncode == 0 and "What is in this picture?" in listed.stdout
    conversation_id = listed.stdout.split()[0]
    shown = run_lva("history", "export", conversation_id, "--format", "json")
    exported = json.loads(shown.stdout)
    roles = [m["role"] for m in exported["messages"]]
    assert roles == ["user", "assistant"]
    assert exported["messages"][1]["text"] == result.stdout[:-1]          # the printed answer, less its newline


def test_ask_json_reports_the_answer_and_its_figures(model_path: str) -> None:
    result = ask(model_path, "--json", "--no-history", "Hello")
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert set(answer) >= {"response", "prompt_tokens", "completion_tokens", "seconds"}
    assert answer["prompt_tokens"] > 0 and answer["conversation_id"] is None
    assert "no conversations" in run_lva("history", "list").stdout


def test_ask_says_when_the_answer_was_cut_at_max_tokens(model_path: str) -> None:
    result = run_lva("ask", "--model", model_path, "--max-tokens", "2", "--temperature", "0", "--json",
                     "--no-history", "Count to a hundred.")
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert (answer["completion_tokens"], answer["done_reason"]) == (2, "length")
    assert "cut at --max-tokens 2" in result.stderr


def test_ask_continue_carries_on_the_last_conversation(model_path: str) -> None:
    assert ask(model_path, "--image", str(IMAGES / "rgb_19x27.png"), "Describe it.").returncode == 0
    result = ask(model_path, "--continue", "--json", "And the colours?")
    assert result.returncode == 0, result.stderr
    conversation_id = json.loads(result.stdout)["conversation_id"]
    exported = json.loads(run_lva("history", "export", str(conversation_id), "--format", "json").stdout)
    assert [m["role"] for m in exported["messages"]] == ["user", "assistant", "user", "assistant"]


def test_ask_reads_the_prompt_from_stdin(model_path: str) -> None:
    result = subprocess.run([sys.executable, "-m", "assistant", "ask", "--model", model_path, "--max-tokens", "4",
                             "--no-history", "-"], input="Hello from stdin", capture_output=True, text=True,
                            cwd=REPO_ROOT, timeout=300)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("problem", ["not an image", "missing image", "unknown model"])
def test_ask_fails_in_one_line(model_path: str, tmp_path: Path, problem: str) -> None:
    bad = tmp_path / "notes.png"
    bad.write_text("not a picture")
    args = {"not an image": ["--image", str(bad), "Hi"], "missing image": ["--image", str(tmp_path / "x.png"), "Hi"],
            "unknown model": ["Hi"]}[problem]
    result = (run_lva("ask", "--model", "no-such-model", *args) if problem == "unknown model"
              else ask(model_path, *args))
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("lva: error:")
    assert "no conversations" in run_lva("history", "list").stdout       # nothing half-kept


def test_ask_works_without_a_network(model_path: str) -> None:
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rn", "true"]).returncode != 0:
        pytest.fail("unshare -rn is needed to run lva without a network (util-linux; .ci/run installs it)")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(["unshare", "-rn", sys.executable, "-m", "assistant", "ask", "--model", model_path,
                             "--max-tokens", "4", "--image", str(IMAGES / "rgb_3x5.png"), "Offline?"],
                            capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=300)
    assert result.returncode == 0, result.stderr


def write_jsonl(path: Path, rows: list[dict | str]) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def batch(model_path: str, source: Path, out: Path, *args: str) -> subprocess.CompletedProcess:
    return run_lva("batch", str(source), "--out", str(out), "--model", model_path, "--max-tokens", "8", *args)


def test_batch_encodes_each_distinct_image_once(model_path: str, tmp_path: Path) -> None:
    shared, other = str(IMAGES / "rgb_173x97.png"), str(IMAGES / "rgb_80x26.png")
    source = write_jsonl(tmp_path / "in.jsonl", [
        {"id": "a", "prompt": "Describe it.", "image": shared},
        {"id": "b", "prompt": "What else?", "image": other},
        {"id": "c", "prompt": "Colours?", "image": shared, "seed": 4, "temperature": 0.9},
    ])
    result = batch(model_path, source, tmp_path / "out.jsonl", "--verbose")
    assert result.returncode == 0, result.stderr
    assert "lva: 2 images encoded" in result.stderr
    records = read_jsonl(tmp_path / "out.jsonl")
    assert sorted(r["id"] for r in records) == ["a", "b", "c"]
    assert all("error" not in r and r["prompt_tokens"] > 0 and r["completion_tokens"] > 0 for r in records)
    assert all(r["done_reason"] == ("length" if r["completion_tokens"] == 8 else "stop") for r in records)


def test_batch_answers_together_what_it_answers_one_at_a_time(model_path: str, tmp_path: Path) -> None:
    """16 questions about 4 images, 4 each, greedy: --parallel 4 writes what --parallel 1 writes."""
    images = ["rgb_173x97.png", "rgb_80x26.png", "gray_26x80.png", "rgba_50x24.png"]
    prompts = ["Describe it.", "What else?", "Colours?", "And the shapes?"]
    source = write_jsonl(tmp_path / "in.jsonl", [
        {"id": f"{i}-{j}", "prompt": prompt, "image": str(IMAGES / image), "temperature": 0}
        for i, image in enumerate(images) for j, prompt in enumerate(prompts)])
    answers = {}
    for parallel in ("1", "4"):
        result = batch(model_path, source, tmp_path / f"out-{parallel}.jsonl", "--parallel", parallel, "--verbose")
        assert result.returncode == 0, result.stderr
        encoded = "4" if parallel == "1" else "0"          # then from the disk cache the first run filled
        assert f"lva: {encoded} images encoded" in result.stderr
        answers[parallel] = {r["id"]: (r["response"], r["completion_tokens"], r["done_reason"])
                             for r in read_jsonl(tmp_path / f"out-{parallel}.jsonl")}
    assert len(answers["4"]) == 16 and answers["4"] == answers["1"]


def test_batch_turns_bad_lines_into_error_records_and_goes_on(model_path: str, tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", [
        {"id": 1, "prompt": "Fine."},
        "{not json",
        {"id": 3, "prompt": "Where is it?", "image": str(tmp_path / "missing.png")},
        {"id": 4},
        {"id": 5, "prompt": "Also fine."},
    ])
    result = batch(model_path, source, tmp_path / "out.jsonl")
    assert result.returncode == 0, result.stderr
    records = {r["id"]: r for r in read_jsonl(tmp_path / "out.jsonl")}
    assert set(records) == {1, "line-2", 3, 4, 5}
    assert "error" not in records[1] and "error" not in records[5]
    assert "not JSON" in records["line-2"]["error"] and "missing.png" in records[3]["error"]
    assert "prompt" in records[4]["error"]


def test_batch_with_a_seed_is_deterministic(model_path: str, tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", [{"id": i, "prompt": f"Say {i}.", "seed": i, "temperature": 1.0}
                                                  for i in range(3)])
    assert batch(model_path, source, tmp_path / "one.jsonl").returncode == 0
    assert batch(model_path, source, tmp_path / "two.jsonl").returncode == 0
    answers = [{r["id"]: r["response"] for r in read_jsonl(tmp_path / name)} for name in ("one.jsonl", "two.jsonl")]
    assert len(answers[0]) == 3 and answers[0] == answers[1]     # lines in the order answers finish


def test_batch_resumes_after_a_kill_without_duplicates_or_torn_lines(model_path: str, tmp_path: Path) -> None:
    rows = [{"id": i, "prompt": f"Question {i}: describe the picture.", "image": str(IMAGES / "rgb_173x97.png")}
            for i in range(400)]
    source, out = write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl"
    child = subprocess.Popen([sys.executable, "-m", "assistant", "batch", str(source), "--out", str(out),
                              "--model", model_path, "--max-tokens", "8"], cwd=REPO_ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not out.exists() or out.read_text().count("\n") < 20):
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    with out.open("a") as f:                              # what a kill mid-write leaves
        f.write('{"id": 999, "respo')
    answered_before = out.read_text().count("\n")
    assert 20 <= answered_before < len(rows)
    result = batch(model_path, source, out)
    assert result.returncode == 0, result.stderr
    ids = [r["id"] for r in read_jsonl(out)]
    assert sorted(ids) == list(range(len(rows)))
