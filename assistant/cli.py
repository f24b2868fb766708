"""The `lva` command line. Every foreseeable failure (an `LvaError`) ends as one line on stderr and a non-zero
exit; anything else is a bug, shown with its traceback and a line that says so."""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

from assistant import store
from models.errors import LvaError

EXIT_ERROR = 1
EXIT_BUG = 70                                        # sysexits.h's EX_SOFTWARE: an internal software error
EXIT_INTERRUPTED = 130
BUG = "lva: this is a bug in lva, not something you did; please report it with the traceback above"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lva", description="Llama 3.2 Vision on llama.cpp, offline.",
        epilog="Get a model: `lva pull llama3.2-vision` (Ollama's ready Q4_K_M, about 8 GB, no account needed), "
               "`lva import` (a model Ollama already downloaded), or "
               "`lva convert meta-llama/Llama-3.2-11B-Vision-Instruct` (from Hugging Face, any quant).")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    from convert.quant_types import DEFAULT_QUANT, QUANT_TYPES, VISION_TYPES

    quant_list = "; ".join(f"{q.name} ({q.description})" for q in QUANT_TYPES.values())
    convert = commands.add_parser(
        "convert", help="convert a Hugging Face checkpoint into a text GGUF and a vision GGUF",
        description="Convert a Llama 3.2 Vision checkpoint (a local directory or a Hub repo id such as "
                    "meta-llama/Llama-3.2-11B-Vision-Instruct) into NAME-text-QUANT.gguf and NAME-vision-QUANT.gguf.",
        epilog=f"quant types: {quant_list}. Vision encoder types: {', '.join(VISION_TYPES)}.")
    convert.add_argument("source", help="checkpoint directory or Hugging Face repo id")
    convert.add_argument("--out", type=Path, help="output directory (default: the model store)")
    convert.add_argument("--quant", default=DEFAULT_QUANT, metavar="TYPE",
                         help=f"text tower and cross-attention type: {', '.join(QUANT_TYPES)} "
                              f"(default {DEFAULT_QUANT})")
    convert.add_argument("--vision-quant", metavar="TYPE",
                         help=f"vision encoder type: {', '.join(VISION_TYPES)} (default F16; F32 with --quant F32)")
    convert.add_argument("--name", help="model name in the file names (default: from the checkpoint)")
    convert.add_argument("--force", action="store_true", help="overwrite existing output files")
    convert.add_argument("--threads", type=int, help="quantizer threads (default: all cores)")

    pull = commands.add_parser(
        "pull", help="download Llama 3.2 Vision from Ollama's registry, ready quantized (e.g. llama3.2-vision)",
        description="Download an mllama model from Ollama's registry (llama3.2-vision, llama3.2-vision:11b, :90b, "
                    "or another of its tags) and import it into NAME-text-QUANT.gguf and NAME-vision-QUANT.gguf. "
                    "Resumes an interrupted download; checks every blob's sha256.")
    pull.add_argument("model", metavar="NAME[:TAG]", help="an Ollama model name, e.g. llama3.2-vision:11b")
    pull.add_argument("--registry", metavar="URL",
                      help="registry to pull from (default: $LVA_OLLAMA_REGISTRY, else https://registry.ollama.ai)")
    _import_options(pull)

    import_ = commands.add_parser(
        "import", help="import Llama 3.2 Vision from a local Ollama store; without a name, list what it holds",
        description="Import an mllama model Ollama stored ($OLLAMA_MODELS, else ~/.ollama/models or "
                    "/usr/share/ollama/.ollama/models) into NAME-text-QUANT.gguf and NAME-vision-QUANT.gguf, "
                    "copying its tensors as they are (no requantization).")
    import_.add_argument("model", nargs="?", metavar="NAME[:TAG]", help="an Ollama model name, e.g. llama3.2-vision")
    _import_options(import_)

    commands.add_parser("models", help="list the converted models in the store")

    from assistant.commands import ask, batch, chat, history, info, rpc_server, serve

    for command in (ask, batch, history, chat, info, rpc_server, serve):
        command.add_parser(commands)
    return parser


def _import_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, help="output directory (default: the model store)")
    parser.add_argument("--name", help="model name in the file names (default: the Ollama name, e.g. "
                                       "llama3.2-vision-11b)")
    parser.add_argument("--force", action="store_true", help="overwrite existing output files")


def run_convert(args: argparse.Namespace) -> int:
    from convert.pipeline import convert

    outputs = convert(args.source, args.out or store.models_dir(), quant=args.quant, vision_quant=args.vision_quant,
                      name=args.name, force=args.force, threads=args.threads, progress=True)
    print(outputs.text)
    print(outputs.vision)
    return 0


def run_pull(args: argparse.Namespace) -> int:
    from convert.ollama.registry import pull

    pair = pull(args.model, args.out or store.models_dir(), store.data_dir() / "downloads", registry=args.registry,
                name=args.name, force=args.force, progress=True)
    print(pair.text)
    print(pair.vision)
    return 0


def run_import(args: argparse.Namespace) -> int:
    from convert.ollama.importer import import_model
    from convert.ollama.store import list_models, open_model

    if args.model is None:
        return _list_ollama_models(list_models())
    pair = import_model(open_model(args.model), args.out or store.models_dir(), name=args.name, force=args.force,
                        progress=True)
    print(f"{args.model}: written by Ollama's {pair.converter.version} converter ({pair.converter.evidence})",
          file=sys.stderr)
    print(pair.text)
    print(pair.vision)
    return 0


def _list_ollama_models(models: list) -> int:
    from convert.ollama.store import MLLAMA, OllamaError

    vision = [m for m in models if MLLAMA in m.families()]
    if not vision:
        others = ", ".join(str(m.name) for m in models) or "nothing"
        raise OllamaError(f"no Llama 3.2 Vision (mllama) model in the Ollama store (it holds: {others}); "
                          f"download one with: lva pull llama3.2-vision")
    print(f"{'OLLAMA MODEL':40} {'SIZE':>9}  IMPORT WITH")
    for model in vision:
        size = sum(layer.size for layer in model.manifest.layers)
        how = (f"legacy format (Ollama v0.4-v0.6): lva pull {model.name}" if model.is_legacy_mllama
               else f"lva import {model.name}")
        print(f"{str(model.name):40} {_human_size(size):>9}  {how}")
    return 0


def run_models(_: argparse.Namespace) -> int:
    from models.gguf_header import HeaderError
    from models.mllama.pairing import pair_id

    models = store.installed_models()
    if not models:
        print(f"no models in {store.models_dir()}; get one with: lva pull llama3.2-vision "
              f"(from Ollama's registry) or lva convert meta-llama/Llama-3.2-11B-Vision-Instruct")
        return 0
    print(f"{'NAME':40} {'QUANT':8} {'SIZE':>9}  FILES")
    for model in models:
        if model.text and model.vision:
            try:
                paired = pair_id(model.text) == pair_id(model.vision)
                files = "text + vision" if paired else "text + vision (NOT a pair: converted separately)"
            except HeaderError as e:
                files = f"text + vision, unreadable: {e}"
        else:
            files = "text only" if model.text else "vision only (text file missing)"
        print(f"{model.name:40} {model.quant:8} {_human_size(model.size):>9}  {files}")
    return 0


def _human_size(n_bytes: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.2f} {unit}"
    return f"{n_bytes} B"


COMMANDS = {"convert": run_convert, "pull": run_pull, "import": run_import, "models": run_models}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        if not (sys.stdin.isatty() and sys.stdout.isatty()):
            parser.print_help()                    # a full-screen app needs a terminal; a pipe gets the commands
            return 0
        from assistant.commands import chat        # plain `lva` in a terminal opens the chat app

        args.run = chat.run
    try:
        return COMMANDS[args.command](args) if args.command in COMMANDS else args.run(args)
    except KeyboardInterrupt:
        kept = {"convert": "nothing was kept", "import": "nothing was kept", "serve": "the server has stopped",
                "pull": "the download so far is kept: run the same command to resume"}.get(
            args.command, "what was answered so far is kept")
        print(f"lva: interrupted; {kept}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except LvaError as error:
        print(f"lva: error: {error}", file=sys.stderr)
        return error.exit_code
    except OSError as error:                         # the machine's: a full disk, a permission, a device
        print(f"lva: error: {error}", file=sys.stderr)
        return EXIT_ERROR
    except Exception:  # noqa: BLE001  (a bug: shown whole, and said to be one)
        traceback.print_exc()
        print(BUG, file=sys.stderr)
        return EXIT_BUG
