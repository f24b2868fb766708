"""A local Ollama store: model names, manifests and blobs, laid out as Ollama's own code lays them out.

    $OLLAMA_MODELS (else ~/.ollama/models; Linux services: /usr/share/ollama/.ollama/models)
      manifests/<host>/<namespace>/<model>/<tag>     JSON: a config blob and layers by media type
      blobs/sha256-<hex>                             content-addressed files; a digest is `sha256:<hex>`

Sources: envconfig.Models, types/model/name.go (defaults registry.ollama.ai / library / latest),
manifest/manifest.go and manifest/paths.go in ollama/ollama (docs/OLLAMA.md cites the commit).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from convert.errors import ConvertError

MODEL = "application/vnd.ollama.image.model"
PROJECTOR = "application/vnd.ollama.image.projector"     # the legacy (v0.4-v0.6) mllama vision blob
TEMPLATE = "application/vnd.ollama.image.template"       # a Go template; lva needs jinja
PARAMS = "application/vnd.ollama.image.params"
LICENSE = "application/vnd.ollama.image.license"
MANIFEST_MEDIA_TYPE = "application/vnd.docker.distribution.manifest.v2+json"

DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"
MLLAMA = "mllama"

_DIGEST = re.compile(r"^sha256[:-](?P<hex>[0-9a-fA-F]{64})$")
_PART = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,79}$")          # Ollama's namespace, model and tag
_HOST = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:-]{0,349}$")


class OllamaError(ConvertError):
    """Something about an Ollama store, registry or file that the user can fix; shown in one line."""


@dataclass(frozen=True)
class OllamaName:
    """`[host/][namespace/]model[:tag]`, with Ollama's defaults for the parts left out."""

    host: str
    namespace: str
    model: str
    tag: str

    @classmethod
    def parse(cls, text: str) -> OllamaName:
        if "@" in text:
            raise OllamaError(f"{text!r}: names with a digest (@sha256:...) are not supported; use NAME[:TAG]")
        *prefix, last = text.strip().split("/")
        model, _, tag = last.partition(":")
        if len(prefix) == 2:
            host, namespace = prefix
        elif len(prefix) == 1:
            host, namespace = DEFAULT_HOST, prefix[0]
        else:
            host, namespace = DEFAULT_HOST, DEFAULT_NAMESPACE
        valid = len(prefix) <= 2 and _HOST.match(host) and all(_PART.match(p) for p in (namespace, model, tag or "x"))
        if not valid:
            raise OllamaError(f"{text!r} is not an Ollama model name like llama3.2-vision or llama3.2-vision:11b")
        return cls(host=host, namespace=namespace, model=model, tag=tag or DEFAULT_TAG)

    def __str__(self) -> str:
        """The shortest form Ollama shows (its DisplayShortest): `llama3.2-vision:11b`."""
        if self.host != DEFAULT_HOST:
            return f"{self.host}/{self.namespace}/{self.model}:{self.tag}"
        if self.namespace != DEFAULT_NAMESPACE:
            return f"{self.namespace}/{self.model}:{self.tag}"
        return f"{self.model}:{self.tag}"

    @property
    def lva_name(self) -> str:
        """The NAME of lva's files: the model, and the tag unless it is `latest`."""
        return self.model if self.tag == DEFAULT_TAG else f"{self.model}-{self.tag}"

    def manifest_path(self, root: Path) -> Path:
        return root / "manifests" / self.host / self.namespace / self.model / self.tag


@dataclass(frozen=True)
class Layer:
    media_type: str
    digest: str          # sha256:<hex>
    size: int

    @property
    def hex(self) -> str:
        return self.digest.split(":", 1)[1]

    @property
    def blob_name(self) -> str:
        """The file name in blobs/: Ollama writes the digest's colon as a dash."""
        return f"sha256-{self.hex}"


@dataclass(frozen=True)
class Manifest:
    config: Layer | None
    layers: tuple[Layer, ...]

    @classmethod
    def parse(cls, data: bytes, where: str) -> Manifest:
        try:
            value = json.loads(data)
            config = value.get("config")
            return cls(config=_layer(config) if config else None,
                       layers=tuple(_layer(layer) for layer in value["layers"]))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise OllamaError(f"the manifest of {where} is not a valid Ollama manifest ({_describe(e)})") from None

    def layers_of(self, media_type: str) -> list[Layer]:
        return [layer for layer in self.layers if layer.media_type == media_type]

    def model_layer(self, where: str) -> Layer:
        models = self.layers_of(MODEL)
        if len(models) != 1:
            raise OllamaError(f"{where} has {len(models)} model layers; lva imports single-file models")
        return models[0]


def _layer(value: dict[str, Any]) -> Layer:
    digest = value["digest"]
    if not isinstance(digest, str) or not _DIGEST.match(digest):
        raise ValueError(f"bad digest {digest!r}")
    return Layer(media_type=str(value["mediaType"]), digest=digest.replace("-", ":", 1), size=int(value["size"]))


@dataclass(frozen=True)
class OllamaModel:
    """One tag of a model: its manifest and the folder its blobs are (or will be) in."""

    name: OllamaName
    manifest: Manifest
    blobs: Path

    def blob(self, layer: Layer) -> Path:
        return self.blobs / layer.blob_name

    def config(self) -> dict[str, Any]:
        """Ollama's config blob ({model_format, model_family, model_families, file_type, ...}), or {} if absent."""
        if self.manifest.config is None or not self.blob(self.manifest.config).is_file():
            return {}
        try:
            value = json.loads(self.blob(self.manifest.config).read_bytes())
        except ValueError:
            return {}
        return value if isinstance(value, dict) else {}

    def families(self) -> list[str]:
        config = self.config()
        families = config.get("model_families") or [config.get("model_family")]
        return [f for f in families if isinstance(f, str) and f]

    @property
    def is_legacy_mllama(self) -> bool:
        """Ollama's own test (server/routes.go since v0.7.0): an mllama family with a projector layer.

        Without a config blob to name the family, a projector layer alone says it.
        """
        families = self.families()
        return bool(self.manifest.layers_of(PROJECTOR)) and (MLLAMA in families or not families)


def store_roots() -> list[Path]:
    """Where Ollama keeps models: $OLLAMA_MODELS if set, else the user's and the Linux service's folders."""
    if os.environ.get("OLLAMA_MODELS"):
        return [Path(os.environ["OLLAMA_MODELS"]).expanduser()]
    return [Path.home() / ".ollama" / "models", Path("/usr/share/ollama/.ollama/models")]


def _existing_roots(roots: list[Path] | None) -> list[Path]:
    candidates = roots if roots is not None else store_roots()
    found = [root for root in candidates if (root / "manifests").is_dir()]
    if not found:
        where = " or ".join(str(root) for root in candidates)
        raise OllamaError(f"no Ollama model store at {where}; set OLLAMA_MODELS to its folder, "
                          f"or download with `lva pull llama3.2-vision`")
    return found


def list_models(roots: list[Path] | None = None) -> list[OllamaModel]:
    """Every readable tag in the stores, sorted by name; manifests that do not parse are skipped."""
    models = []
    for root in _existing_roots(roots):
        for path in sorted((root / "manifests").glob("*/*/*/*")):
            if not path.is_file():
                continue
            host, namespace, model, tag = path.relative_to(root / "manifests").parts
            name = OllamaName(host, namespace, model, tag)
            try:
                models.append(OllamaModel(name, Manifest.parse(path.read_bytes(), str(name)), root / "blobs"))
            except (OllamaError, OSError):
                continue
    return models


def open_model(text: str, roots: list[Path] | None = None) -> OllamaModel:
    """The tag `text` names, from the first store that has it."""
    name = OllamaName.parse(text)
    searched = _existing_roots(roots)
    for root in searched:
        path = name.manifest_path(root)
        if path.is_file():
            try:
                data = path.read_bytes()
            except OSError as e:
                raise OllamaError(f"cannot read the manifest of {name} ({e.strerror})") from None
            return OllamaModel(name, Manifest.parse(data, str(name)), root / "blobs")
    where = ", ".join(str(root) for root in searched)
    raise OllamaError(f"no Ollama model {name} in {where}; `lva import` lists the models there, "
                      f"`lva pull {name}` downloads it")


def _describe(error: Exception) -> str:
    if isinstance(error, KeyError):
        return f"missing {error.args[0]!r}"
    return str(error).splitlines()[0] if str(error) else type(error).__name__
