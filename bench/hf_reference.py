"""HF transformers' vision tower + projector in bf16, timed by bench/hf_vision_reference.py in another
interpreter (torch is not a dependency of lva): the encode target's yardstick."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from synthetic_pair import Depth

REPO = Path(__file__).resolve().parent.parent
DEFAULT_REFERENCE_PYTHON = Path("/work/refvenv/bin/python")


@dataclass
class Reference:
    seconds: float | None
    note: str
    details: dict = field(default_factory=dict)


def run_reference(choice: str, depth: Depth, threads: int) -> Reference:
    """HF's bf16 vision tower + projector on 4 tiles, timed by bench/hf_vision_reference.py in a child."""
    python = _reference_python(choice)
    if isinstance(python, Reference):
        print(python.note, flush=True)
        return python
    command = [str(python), str(REPO / "bench" / "hf_vision_reference.py"), "--threads", str(threads),
               "--local-layers", str(depth.vision_layers), "--global-layers", str(depth.global_layers)]
    print(f"HF reference: {' '.join(command)}", flush=True)
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if done.returncode:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return Reference(None, f"the HF reference failed (exit {done.returncode}): {tail}")
    details = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"HF reference: {details['seconds']:.1f} s", flush=True)
    return Reference(details["seconds"], f"torch {details['torch']}, transformers {details['transformers']}, "
                                         f"attention `{details['attn_implementation']}`", details)


def _reference_python(choice: str) -> Path | Reference:
    if choice == "none":
        return Reference(None, "HF reference skipped (--reference-python none)")
    python = DEFAULT_REFERENCE_PYTHON if choice == "auto" else Path(choice)
    if not python.exists():
        return Reference(None, f"HF reference skipped: {python} does not exist (--reference-python PYTHON)")
    probe = subprocess.run([str(python), "-c", "import torch, transformers"], capture_output=True, text=True)
    if probe.returncode:
        return Reference(None, f"HF reference skipped: {python} cannot import torch and transformers")
    return python
