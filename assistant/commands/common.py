"""What every model-running command shares: choosing and loading the model, its devices, sampling options."""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from pathlib import Path
from typing import Callable

from assistant import store
from assistant.chat.engine import DEFAULT_MAX_TOKENS, Sampling


def positive_int(text: str) -> int:
    """An argparse type for counts (tokens, threads): a whole number of at least 1, refused before anything loads."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (got {value})")
    return value


def add_context_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ctx", type=positive_int, default=4096, help="context length in tokens (default 4096)")


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="model name in the store or path to a text GGUF "
                                        "(default: the only model in the store)")
    add_context_option(parser)
    parser.add_argument("--threads", type=positive_int, help="CPU threads (default: all cores)")
    parser.add_argument("--max-tokens", type=positive_int, default=DEFAULT_MAX_TOKENS, help="longest answer in tokens")
    parser.add_argument("--temperature", type=float, default=Sampling.temperature, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=Sampling.top_p)
    parser.add_argument("--top-k", type=int, default=Sampling.top_k)
    parser.add_argument("--seed", type=int, help="sampling seed, for repeatable answers")
    parser.add_argument("--verbose", action="store_true", help="say on stderr what the model is doing")
    add_device_options(parser)


def add_device_options(parser: argparse.ArgumentParser) -> None:
    """Where the model runs: how many layers go to the GPU(s), and remote devices (ggml RPC servers)."""
    parser.add_argument("--gpu-layers", type=int, default=-1, metavar="N",
                        help="text layers to run on the GPU(s), the last N (default: all; 0: only the CPU); "
                             "a smaller N fits a smaller GPU. The cross-attention layers follow them")
    parser.add_argument("--rpc", metavar="HOST:PORT[,HOST:PORT]",
                        help="also run on the devices of these ggml RPC servers (`lva rpc-server` on another "
                             "machine); no authentication: use only on a network you trust")


def add_parallel_option(parser: argparse.ArgumentParser, what: str, honour: str | None = None) -> None:
    from assistant.runtime.capacity import DEFAULT_PARALLEL

    also = f"; ${honour} is read when --parallel is not given" if honour else ""
    parser.add_argument("--parallel", type=int, metavar="N",
                        help=f"{what}, decoded in one batch per step, each in its own --ctx (default: "
                             f"{DEFAULT_PARALLEL}, or fewer if {DEFAULT_PARALLEL} sequences of --ctx tokens do not "
                             f"fit in free memory{also})")


def parallel_from(args: argparse.Namespace, text: Path | None, environment: str | None = None) -> int:
    """--parallel (or the environment variable), checked against free memory before anything loads: one line
    when N sequences of --ctx tokens do not fit."""
    from assistant.runtime.capacity import DEFAULT_PARALLEL, sequences_that_fit
    from assistant.runtime.errors import ModelError

    wanted = args.parallel
    if wanted is None and environment and os.environ.get(environment, "").strip():
        try:
            wanted = int(os.environ[environment]) or None          # 0: Ollama's "choose for me"
        except ValueError:
            raise ModelError(f"${environment}={os.environ[environment]} is not a number") from None
    if wanted is not None and wanted < 1:
        said = "--parallel" if args.parallel is not None else f"${environment}"
        raise ModelError(f"{said} must be at least 1 (got {wanted})")
    if text is None:
        return wanted or DEFAULT_PARALLEL
    from gguf import LlamaFileType

    from models.file_type import read_file_type

    files = [text] + [f for f in [store.find_vision_file(text)] if f is not None]
    bytes_per_value = 4 if read_file_type(text) == LlamaFileType.ALL_F32 else 2     # the KV cache follows the weights
    return sequences_that_fit(files, args.ctx, wanted, bytes_per_value)


def device_options(args: argparse.Namespace) -> dict:
    """`load_model` keyword arguments from --gpu-layers and --rpc (plain `lva` has neither: all layers, no RPC)."""
    servers = [s.strip() for s in (getattr(args, "rpc", None) or "").split(",") if s.strip()]
    return {"n_gpu_layers": getattr(args, "gpu_layers", -1), "rpc_servers": servers}


def sampling_from(args: argparse.Namespace) -> Sampling:
    return Sampling(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, max_tokens=args.max_tokens,
                    seed=args.seed)


def load(args: argparse.Namespace, text: Path | None = None):
    """The chosen model (or the text GGUF `text`), loaded with the command line's options; progress on
    stderr with --verbose."""
    from assistant import load_model
    from assistant.chat.feature_cache import FeatureCache

    text = text or store.resolve_model(args.model)
    model = load_model(text, n_ctx=args.ctx, n_threads=args.threads, progress=progress_line(args.verbose),
                       feature_cache=FeatureCache(), **device_options(args))
    if args.verbose:
        print(f"lva: running on {model.placement.summary()}", file=sys.stderr)
    return model


def progress_line(verbose: bool = False) -> Callable[[str, float], None]:
    """Progress on stderr: the one-time measurement of the CPU's kernels always (a few seconds, once per
    machine and version: the user should know why the first start is slower), every stage with --verbose."""
    from assistant.runtime.kernel_choice import MEASURING

    def report(stage: str, fraction: float) -> None:
        if stage == MEASURING and sys.stderr.isatty():
            end = "\n" if fraction >= 1.0 else ""
            print(f"\rlva: {stage} (once): {100 * fraction:3.0f} %", end=end, file=sys.stderr, flush=True)
        elif stage == MEASURING and fraction in (0.0, 1.0):
            print(f"lva: {stage} (once): {'started' if fraction == 0.0 else 'done'}", file=sys.stderr)
        elif verbose and fraction >= 1.0:
            print(f"lva: {stage}: done", file=sys.stderr)
    return report


def is_loopback(host: str) -> bool:
    """Whether only this machine can reach an address (a name other than localhost is not trusted to be)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
