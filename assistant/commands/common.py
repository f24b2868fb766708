"""What every model-running command shares: choosing and loading the model, sampling options."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from assistant import store
from assistant.chat.engine import DEFAULT_MAX_TOKENS, Sampling


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="model name in the store or path to a text GGUF "
                                        "(default: the only model in the store)")
    parser.add_argument("--ctx", type=int, default=4096, help="context length in tokens (default 4096)")
    parser.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    parser.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help="longest answer in tokens")
    parser.add_argument("--temperature", type=float, default=Sampling.temperature, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=Sampling.top_p)
    parser.add_argument("--top-k", type=int, default=Sampling.top_k)
    parser.add_argument("--seed", type=int, help="sampling seed, for repeatable answers")
    parser.add_argument("--verbose", action="store_true", help="say on stderr what the model is doing")


def sampling_from(args: argparse.Namespace) -> Sampling:
    return Sampling(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, max_tokens=args.max_tokens,
                    seed=args.seed)


def load(args: argparse.Namespace, text: Path | None = None):
    """The chosen model (or the text GGUF `text`), loaded with the command line's options; progress on
    stderr with --verbose."""
    from assistant import load_model
    from assistant.chat.feature_cache import FeatureCache

    text = text or store.resolve_model(args.model)
    progress = _report if args.verbose else None
    return load_model(text, n_ctx=args.ctx, n_threads=args.threads, progress=progress, feature_cache=FeatureCache())


def _report(stage: str, fraction: float) -> None:
    if fraction >= 1.0:
        print(f"lva: {stage}: done", file=sys.stderr)
