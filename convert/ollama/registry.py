"""`lva pull`: fetch an mllama model from Ollama's registry, then import it.

The registry speaks the Docker registry v2 layout Ollama's server/images.go uses:

    GET {registry}/v2/{namespace}/{model}/manifests/{tag}      the manifest (JSON)
    GET {registry}/v2/{namespace}/{model}/blobs/sha256:{hex}   a blob; registry.ollama.ai redirects to a CDN

Blobs land in a downloads folder as `sha256-<hex>-partial`, resume with an HTTP Range request after a cut
connection (at once while bytes keep coming, and in the next run after a failure), are checked against their
sha256 before anything reads them, and are deleted once the import has written lva's pair.
LVA_OLLAMA_REGISTRY (or --registry) points at another registry: the tests' local server, or a mirror.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import time
from pathlib import Path

import httpx2
from tqdm import tqdm

from convert.ollama.importer import LEGACY, ImportedPair, import_model
from convert.ollama.store import (DEFAULT_HOST, MANIFEST_MEDIA_TYPE, MLLAMA, Layer, Manifest, OllamaError, OllamaModel,
                                  OllamaName)
from convert.pipeline import output_paths

REGISTRY_ENV = "LVA_OLLAMA_REGISTRY"
DEFAULT_REGISTRY = f"https://{DEFAULT_HOST}"
ATTEMPTS = 4                # a cut connection resumes at once; four failures in a row without progress stop
RETRY_SECONDS = 0.5
CHUNK = 1 << 20
TIMEOUT = httpx2.Timeout(30.0)
UNQUANTIZED = ("F16", "BF16", "F32")


def registry_url(name: OllamaName, flag: str | None = None) -> str:
    """--registry, else $LVA_OLLAMA_REGISTRY, else the host the name gives (https, as Ollama's BaseURL)."""
    if flag or os.environ.get(REGISTRY_ENV):
        return (flag or os.environ[REGISTRY_ENV]).rstrip("/")
    return DEFAULT_REGISTRY if name.host == DEFAULT_HOST else f"https://{name.host}"


def pull(name_text: str, out_dir: Path, downloads: Path, registry: str | None = None, name: str | None = None,
         force: bool = False, progress: bool = True) -> ImportedPair:
    """Download `name_text` (e.g. `llama3.2-vision:11b`) into `downloads`, import it into `out_dir`."""
    ollama_name = OllamaName.parse(name_text)
    base = registry_url(ollama_name, registry)
    with httpx2.Client(follow_redirects=True, timeout=TIMEOUT) as client:
        source = _Registry(client, base, ollama_name)
        model = OllamaModel(ollama_name, Manifest.parse(source.manifest(), str(ollama_name)), downloads)
        layer = model.manifest.model_layer(str(ollama_name))
        if model.manifest.config is not None:
            source.fetch(model.manifest.config, downloads, progress=False)
        _check_family(model)
        _refuse_existing_outputs(model, out_dir, name, force)
        _check_disk_space(downloads, out_dir, layer)
        source.fetch(layer, downloads, progress=progress)
    pair = import_model(model, out_dir, name=name, force=force, progress=progress)
    for done in (layer, model.manifest.config):
        if done is not None:
            model.blob(done).unlink(missing_ok=True)
    return pair


class _Registry:
    """One model on one registry, over one HTTP client; every failure a user can meet becomes an OllamaError."""

    def __init__(self, client: httpx2.Client, base: str, name: OllamaName) -> None:
        self.client, self.base, self.name = client, base, name
        self.path = f"{base}/v2/{name.namespace}/{name.model}"

    def manifest(self) -> bytes:
        response = self._request("GET", f"{self.path}/manifests/{self.name.tag}",
                                 headers={"Accept": MANIFEST_MEDIA_TYPE})
        if response.status_code == 404:
            tags = (f"; its tags are listed at https://ollama.com/library/{self.name.model}/tags"
                    if self.base == DEFAULT_REGISTRY and self.name.namespace == "library" else "")
            raise OllamaError(f"{self.base} has no model {self.name} (unknown model or tag){tags}")
        self._check_status(response, "the manifest")
        return response.content

    def fetch(self, layer: Layer, downloads: Path, progress: bool) -> Path:
        """The verified blob in `downloads`, downloaded (or resumed) as needed."""
        downloads.mkdir(parents=True, exist_ok=True)
        final = downloads / layer.blob_name
        if final.is_file() and final.stat().st_size == layer.size and _sha256(final, progress) == layer.hex:
            return final
        partial = downloads / f"{layer.blob_name}-partial"
        with tqdm(total=layer.size, unit="B", unit_scale=True, unit_divisor=1024, desc=f"pulling {self.name}",
                  disable=None if progress else True, file=sys.stderr) as bar:
            failures = 0                # in a row, without a byte of progress
            while True:
                before = _size_of(partial)
                try:
                    self._download(layer, partial, bar)
                    break
                except (httpx2.TransportError, httpx2.StreamError) as e:
                    failures = 0 if _size_of(partial) > before else failures + 1
                    if failures >= ATTEMPTS:
                        raise OllamaError(f"the download of {self.name} stopped at {_size(_size_of(partial))} of "
                                          f"{_size(layer.size)} ({_reason(e)}); run the same `lva pull` again to "
                                          f"resume") from None
                    time.sleep(RETRY_SECONDS * failures)
        if _sha256(partial, progress) != layer.hex:
            partial.unlink()
            raise OllamaError(f"a blob of {self.name} from {self.base} failed its sha256 check ({layer.digest}); "
                              f"it was deleted, nothing was imported; run `lva pull` again")
        os.replace(partial, final)
        return final

    def _download(self, layer: Layer, partial: Path, bar: tqdm) -> None:
        """Append to `partial` from where it stops, with a Range request when it is not empty."""
        start = _size_of(partial)
        if start > layer.size:
            partial.unlink()
            start = 0
        bar.reset(total=layer.size)
        bar.update(start)
        if start == layer.size:
            return
        headers = {"Range": f"bytes={start}-"} if start else {}
        with self.client.stream("GET", f"{self.path}/blobs/{layer.digest}", headers=headers) as response:
            if response.status_code == 404:
                raise OllamaError(f"{self.base} has no blob {layer.digest} that the manifest of {self.name} names")
            self._check_status(response, "a blob")
            if start and response.status_code != 206:      # the server ignored the range: start over
                start = 0
                bar.reset(total=layer.size)
            with open(partial, "ab" if start else "wb") as out:
                for chunk in response.iter_bytes():          # as it arrives: a cut loses nothing received
                    out.write(chunk)
                    bar.update(len(chunk))
        if partial.stat().st_size < layer.size:
            raise httpx2.RemoteProtocolError("the server closed the connection early")

    def _request(self, method: str, url: str, headers: dict[str, str]) -> httpx2.Response:
        try:
            return self.client.request(method, url, headers=headers)
        except httpx2.TransportError as e:
            raise OllamaError(f"cannot reach the Ollama registry at {self.base} ({_reason(e)}); check the "
                              f"network, or set {REGISTRY_ENV} to another registry") from None

    def _check_status(self, response: httpx2.Response, what: str) -> None:
        if response.status_code in (401, 403):
            raise OllamaError(f"{self.base} refused {what} of {self.name} (HTTP {response.status_code}); "
                              f"lva pulls public models only")
        if response.status_code >= 400:
            raise OllamaError(f"{self.base} answered HTTP {response.status_code} for {what} of {self.name}")


def _check_family(model: OllamaModel) -> None:
    """Before the big download: the config blob says what the model is (Ollama's model_family)."""
    if model.is_legacy_mllama:
        raise OllamaError(LEGACY.format(name=model.name))
    families = model.families()
    if families and MLLAMA not in families:
        kind = "a text-only Llama" if families[0] == "llama" else f"a {families[0]!r} model"
        raise OllamaError(f"{model.name} is {kind}, not Llama 3.2 Vision ('mllama'); try llama3.2-vision")


def _refuse_existing_outputs(model: OllamaModel, out_dir: Path, name: str | None, force: bool) -> None:
    """Before the big download: the pair this pull would write is not there already. The config's file_type
    is the blob's general.file_type, F16 for every file Ollama's converter wrote whatever its tensors; the
    import names the pair from its tensors, so an F16 label may become F16, BF16 or F32."""
    label = str(model.config().get("file_type", "")).upper()
    if force or not label:
        return
    for quant in UNQUANTIZED if label == "F16" else (label,):
        outputs = output_paths(out_dir, name or model.name.lva_name, quant)
        existing = [p.name for p in (outputs.text, outputs.vision) if p.exists()]
        if existing:
            raise OllamaError(f"{existing[0]} already exists in {out_dir}; pass --force to overwrite")


def _check_disk_space(downloads: Path, out_dir: Path, layer: Layer) -> None:
    """The blob, and lva's pair (about the blob's size) next to it, must fit before a byte is fetched."""
    fetched = _size_of(downloads / f"{layer.blob_name}-partial")
    download_folder, out_folder = _existing(downloads), _existing(out_dir)
    remaining = layer.size - fetched
    same_device = os.stat(out_folder).st_dev == os.stat(download_folder).st_dev
    needs = ({download_folder: remaining + layer.size} if same_device
             else {download_folder: remaining, out_folder: layer.size})
    for folder, needed in needs.items():
        free = shutil.disk_usage(folder).free
        if needed > free:
            raise OllamaError(f"not enough disk space in {folder}: the pull needs about {needed / 1e9:.1f} GB, "
                              f"{free / 1e9:.1f} GB are free")


def _existing(folder: Path) -> Path:
    """The folder, or its nearest existing parent (where it will be created)."""
    while not folder.exists() and folder.parent != folder:
        folder = folder.parent
    return folder


def _sha256(path: Path, progress: bool) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f, tqdm(total=path.stat().st_size, unit="B", unit_scale=True, unit_divisor=1024,
                                     desc="verifying sha256", disable=None if progress else True,
                                     file=sys.stderr) as bar:
        while block := f.read(16 * CHUNK):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


def _size_of(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def _size(n_bytes: int) -> str:
    if n_bytes >= 1e8:
        return f"{n_bytes / 1e9:.2f} GB"
    return f"{n_bytes / 1e6:.1f} MB" if n_bytes >= 1e5 else f"{n_bytes} bytes"


def _reason(error: BaseException) -> str:
    text = str(error)
    return text.splitlines()[0] if text else type(error).__name__

