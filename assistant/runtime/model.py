"""A converted Llama 3.2 Vision pair running on llama.cpp: the runtime contract of DESIGN.md.

The text file is a plain llama model decoded by llama.cpp; the vision file's tower and cross-attention
layers run as ggml graphs on the devices llama.cpp uses (placement.py says which part goes where), joined
to the decoder by `CrossAttentionHook`. This class decodes one sequence at a time (the chat app, `lva ask`,
the Python API); `ParallelDecoder` (parallel.py) decodes several together over the same model.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Any, Callable, Generator, Iterator, Sequence

import llama_cpp
import numpy as np
from gguf import LlamaFileType

from assistant.images import ImageSource, PreprocessedImage, load_image, preprocess
from assistant.runtime import kernel_choice, llama_log
from assistant.runtime.devices import offload_devices
from assistant.runtime.errors import ModelError
from assistant.runtime.hook import Batch, CrossAttentionHook
from assistant.runtime.image_store import FeatureStore, ImageStore
from assistant.runtime.pieces import text_of
from assistant.runtime.placement import Placement
from assistant.runtime.sampling import SamplingParams, sampler_chain
from assistant.runtime.vision_file import VisionFile
from assistant.store import find_vision_file
from models import ggml, rpc
from models.file_type import read_file_type
from models.gguf_tensors import GGUFError
from models.kernels.paths import GGML_PATHS, KernelError, Paths
from models.mllama import gguf_keys as K
from models.mllama.image_kv import ImageKV
from models.mllama.vision import ImageEncoder

Progress = Callable[[str, float], None]
IMAGE_TOKEN = "<|image|>"
KV_CACHE_TYPES = {"f32": llama_cpp.GGML_TYPE_F32, "f16": llama_cpp.GGML_TYPE_F16, "q8_0": llama_cpp.GGML_TYPE_Q8_0}
ALL_LAYERS = -1                                   # llama.cpp's n_gpu_layers for "offload everything"
SOLO = 0                                          # the sequence of the one-at-a-time API


class MllamaModel:
    """See DESIGN.md, "The runtime contract". Not thread-safe: one caller at a time."""

    def __init__(self, text_path: Path, vision_path: Path | None, n_ctx: int = 4096, n_threads: int | None = None,
                 kv_cache_type: str | None = None, n_batch: int = 512, n_ubatch: int | None = None,
                 progress: Progress | None = None, feature_cache: FeatureStore | None = None,
                 n_gpu_layers: int = ALL_LAYERS, rpc_servers: Sequence[str] = (),
                 kernel_paths: Paths | None = None) -> None:
        llama_log.route()
        llama_cpp.llama_backend_init()
        self.n_ctx = n_ctx
        self.n_batch = n_batch                      # tokens per llama_decode call (at most n_ctx)
        self.n_ubatch = min(n_batch, n_ubatch or n_batch)   # llama.cpp splits each call into these
        self.prompt_tokens_evaluated = 0            # by the last generate call: what the KV cache could not reuse
        self.feature_cache = feature_cache
        self.n_threads = n_threads or max(1, os.cpu_count() or 1)
        if kv_cache_type is not None and kv_cache_type not in KV_CACHE_TYPES:
            raise ModelError(f"unknown KV cache type {kv_cache_type!r} (one of {', '.join(KV_CACHE_TYPES)})")
        self.text_path = Path(text_path)
        self.n_gpu_layers = n_gpu_layers
        try:
            self.offload_devices = offload_devices(rpc_servers)
        except rpc.RpcError as exc:
            raise ModelError(str(exc)) from None
        self._backends: dict[str, ggml.Backend] = {}
        self._device_list: ctypes.Array | None = None      # what llama.cpp's loader points to, kept alive with it
        self._load_progress: Any = None                    # the ctypes progress callback, kept alive with it
        self._model = None
        self._model, self.placement = self._load_text(self.text_path, progress)
        self.kv_cache_type = KV_CACHE_TYPES[kv_cache_type or self._default_kv_cache_type()]
        self.vocab = llama_cpp.llama_model_get_vocab(self._model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.vision: VisionFile | None = None
        self.kernel_paths: Paths = GGML_PATHS       # what lva's CPU kernels run (`_kernel_paths`)
        self._wanted_paths = kernel_paths
        self.hook: CrossAttentionHook | None = None
        self._scratch: ggml.Scratch | None = None
        self.images: ImageStore | None = None
        self._ctx = None
        self._ctx_tokens: list[int] = []
        self._ctx_image: str | None = None
        if vision_path is not None:
            self._attach_vision(Path(vision_path), progress)
        self.image_token_id = (self.vision.hp.image_token_id if self.vision else self.n_vocab)

    # ------------------------------------------------------------------------------------------ loading

    def _load_text(self, path: Path, progress: Progress | None):
        """llama.cpp's model, and where it put each layer (it logs that while it loads)."""
        if not path.is_file():
            raise ModelError(f"{path}: no such model file")
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = self.n_gpu_layers
        self._device_list = (ctypes.c_void_p * (len(self.offload_devices) + 1))(
            *(d.handle for d in self.offload_devices), None)
        params.devices = ctypes.addressof(self._device_list)
        failed: list[Exception] = []
        if progress:
            def on_progress(fraction: float, _user_data) -> bool:
                try:
                    progress("loading text model", float(fraction))
                except Exception as exc:  # noqa: BLE001  (ctypes would print and drop it: raised after the load)
                    failed.append(exc)
                    return False
                return True
            self._load_progress = llama_cpp.llama_progress_callback(on_progress)
            params.progress_callback = self._load_progress
        with llama_log.collected() as log:
            model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if failed:
            raise failed[0]
        if not model:
            out_of_memory = llama_log.out_of_memory(log)
            if out_of_memory:
                raise ModelError(f"{path.name} does not fit ({out_of_memory}); {self._fewer_layers_hint()}")
            raise ModelError(f"{path.name} could not be loaded by llama.cpp (not a GGUF text model, or truncated)")
        n_layer = llama_cpp.llama_model_n_layer(model)
        return model, Placement.from_llama_log([text for _, text in log], n_layer)

    def _fewer_layers_hint(self) -> str:
        if self.n_gpu_layers == 0:
            return "free some memory or use a smaller model"
        shown = "all" if self.n_gpu_layers < 0 else str(self.n_gpu_layers)
        return f"try a smaller --gpu-layers (now {shown}; 0 runs everything on the CPU)"

    def backend_for(self, device_name: str) -> ggml.Backend:
        """The backend of a device, started on first use (one per device, shared by every part placed there)."""
        if device_name not in self._backends:
            device = ggml.device_named(device_name)
            if device is None:
                raise ModelError(f"llama.cpp placed layers on {device_name}, which ggml does not know")
            self._backends[device_name] = ggml.Backend(self.n_threads, device)
        return self._backends[device_name]

    def _default_kv_cache_type(self) -> str:
        """F32 weights get an F32 cache, so an F32 pair is exact by default (an F16 cache moves its logits by
        ~3e-3); everything else gets llama.cpp's F16. The weights' type comes from the tensors, not from
        general.file_type, which an Ollama file sets to F16 whatever it holds (models/file_type.py)."""
        return "f32" if read_file_type(self.text_path) == LlamaFileType.ALL_F32 else "f16"

    def _text_metadata(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(256)
        n = llama_cpp.llama_model_meta_val_str(self._model, key.encode(), buf, len(buf))
        if n >= len(buf):                       # the value's length comes back when it did not fit
            buf = ctypes.create_string_buffer(n + 1)
            n = llama_cpp.llama_model_meta_val_str(self._model, key.encode(), buf, len(buf))
        return buf.value.decode() if n >= 0 else None

    @property
    def chat_template(self) -> str | None:
        """The Jinja chat template the converter copied from the checkpoint (`tokenizer.chat_template`)."""
        return self._text_metadata("tokenizer.chat_template")

    def special_token_text(self, token: int) -> str:
        """How a special token is written in a prompt, e.g. BOS as `<|begin_of_text|>`."""
        buf = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, True)
        return buf.raw[:max(n, 0)].decode("utf-8", errors="replace")

    @property
    def bos_token(self) -> int:
        return llama_cpp.llama_vocab_bos(self.vocab)

    @property
    def n_ctx_train(self) -> int:
        """The context length the model was trained with (`llama.context_length`)."""
        return llama_cpp.llama_model_n_ctx_train(self._model)

    def _attach_vision(self, path: Path, progress: Progress | None) -> None:
        if not path.is_file():
            raise ModelError(f"{path}: no such vision file")
        try:
            vision = VisionFile(path)
        except GGUFError as exc:
            raise ModelError(str(exc)) from None
        text_pair = self._text_metadata(K.PAIR_ID)
        if text_pair is None or text_pair != vision.pair_id:
            vision.close()
            raise ModelError(f"{path.name} is not the vision file of {self.text_path.name} (they were converted "
                             f"separately); use the pair `lva convert` wrote together")
        self.placement = self.placement.with_cross_layers(vision.hp.text.cross_attention_layers)
        try:
            self.kernel_paths = self._kernel_paths(vision, progress)
            tower = vision.load(lambda name: self.backend_for(self.placement.device_of_vision_tensor(name)),
                                self.vision_backend.is_cpu, self.kernel_paths, progress)
        except (GGUFError, ModelError) as exc:
            vision.close()
            raise ModelError(str(exc)) from None
        except KernelError as exc:
            vision.close()
            raise ModelError(str(exc)) from None
        except ggml.DeviceError as exc:
            vision.close()
            raise ModelError(f"{path.name} does not fit ({exc}); {self._fewer_layers_hint()}") from None
        self.vision = vision
        self._scratch = ggml.Scratch(self.vision_backend)
        n_self = llama_cpp.llama_model_n_layer(self._model)
        hook = CrossAttentionHook(self.cross_backends, vision.cross_layers, vision.gates, vision.hp.text,
                                  vision.image_token_embedding, vision.hp.image_token_id, n_self,
                                  self.kernel_paths.cross_attention)
        encoder = ImageEncoder(self.vision_backend, self._scratch, tower, vision.cross_layers, vision.hp,
                               vision.kv_type)
        self.hook = hook
        self.images = ImageStore(vision, encoder, self.vision_backend, self.cross_backends, self.feature_cache,
                                 lambda: hook.bound_images)

    def _kernel_paths(self, vision: VisionFile, progress: Progress | None) -> Paths:
        """The paths of lva's CPU kernels, measured on this machine (or kept from an earlier measurement),
        where any part that runs them is on the CPU: a tower that is not F32, or cross layers with F16 image
        K/V. An F32 pair is exact and runs ggml's own ops, so it needs no measurement."""
        tower_on_cpu = self.vision_backend.is_cpu and vision.tower_type != int(ggml.F32)
        cross_on_cpu = vision.kv_type == ggml.F16 and any(b.is_cpu for b in self.cross_backends.values())
        if not (tower_on_cpu or cross_on_cpu):
            return GGML_PATHS
        if self._wanted_paths is not None:
            return kernel_choice.checked(self._wanted_paths)
        return kernel_choice.choose(self.n_threads, progress)

    @property
    def vision_backend(self) -> ggml.Backend:
        """Where the vision tower runs."""
        return self.backend_for(self.placement.vision)

    @property
    def cross_backends(self) -> dict[int, ggml.Backend]:
        """Where each cross layer runs and keeps its image K/V (stack index -> backend)."""
        return {index: self.backend_for(name) for index, name in self.placement.cross_layers.items()}

    # ------------------------------------------------------------------------------------------ text

    def tokenize(self, text: str, add_bos: bool = False) -> list[int]:
        """Special tokens written in the text are parsed as such; `<|image|>` becomes `image_token_id`."""
        ids: list[int] = []
        for i, part in enumerate(text.split(IMAGE_TOKEN)):
            if i:
                ids.append(self.image_token_id)
            ids.extend(self._tokenize_text(part, add_bos=add_bos and i == 0))
        return ids

    def _tokenize_text(self, text: str, add_bos: bool) -> list[int]:
        data = text.encode()
        capacity = len(data) + 8
        buf = (llama_cpp.llama_token * capacity)()
        n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, capacity, add_bos, True)
        return list(buf[:n])

    def token_bytes(self, token: int) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        return buf.raw[:n]

    def is_end_of_turn(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))

    # ------------------------------------------------------------------------------------------ images

    def preprocess(self, image: ImageSource) -> PreprocessedImage:
        vision = self._require_vision()
        v = vision.hp.vision
        return preprocess(load_image(image), vision.hp.preprocessing, v.image_size, v.max_num_tiles,
                          v.supported_aspect_ratios)

    def encode_image(self, image: ImageSource, progress: Progress | None = None,
                     cancelled: Callable[[], bool] | None = None) -> tuple[str, ImageKV]:
        """K/V of every cross layer for an image, from the in-memory cache when this image was seen.

        `cancelled()` is asked between the encoder's stages (about a second apart on a CPU); when it says
        True, EncodeCancelled is raised and nothing is kept."""
        return self._require_images().encode(image, progress, cancelled)

    def image_encoding(self, image: ImageSource):
        """The encode of `encode_image` one stage at a time (a generator returning (key, K/V))."""
        return self._require_images().encoding(image)

    def image_key(self, image: ImageSource) -> str:
        return self._require_images().key(image)

    @property
    def images_encoded(self) -> int:
        """Runs of the vision encoder (cache hits do not count)."""
        return self.images.encoded if self.images else 0

    def _require_vision(self) -> VisionFile:
        if self.vision is None:
            raise ModelError(f"{self.text_path.name} has no vision file, so it cannot look at images")
        return self.vision

    def _require_images(self) -> ImageStore:
        self._require_vision()
        if self.images is None:
            raise RuntimeError("the vision file is attached but its image store is not")
        return self.images

    # ------------------------------------------------------------------------------------------ contexts and batches

    @property
    def has_context(self) -> bool:
        """Whether the one-sequence context exists yet (it is created at the first prompt)."""
        return self._ctx is not None

    def forget_context(self) -> None:
        """The next prompt is evaluated from position 0, as a new conversation's, in the same context."""
        self._ctx_tokens, self._ctx_image = [], None

    def set_context_length(self, n_ctx: int) -> None:
        """Decode in contexts of `n_ctx` tokens from now on. A change drops the kept context, so the next
        prompt is evaluated whole; the weights and encoded images stay."""
        if n_ctx == self.n_ctx:
            return
        if n_ctx < 1:
            raise ModelError(f"a context of {n_ctx} tokens is too small")
        if self._ctx is not None:
            llama_cpp.llama_free(self._ctx)
            self._ctx, self._ctx_tokens, self._ctx_image = None, [], None
        self.n_ctx = n_ctx

    def new_context(self, n_ctx: int, sequences: int = 1, n_batch: int | None = None):
        """A llama.cpp context of `n_ctx` cells for up to `sequences` sequences, in one unified KV cache (so
        llama.cpp keeps a batch's rows in order: the hook counts them). The caller frees it (llama_free)."""
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx
        batch = min(n_ctx, n_batch or self.n_batch)
        params.n_batch, params.n_ubatch = batch, min(batch, self.n_ubatch)
        params.n_seq_max, params.kv_unified = sequences, True
        params.n_threads = params.n_threads_batch = self.n_threads
        params.type_k = params.type_v = self.kv_cache_type
        if self.kv_cache_type == llama_cpp.GGML_TYPE_F32:      # exact mode: llama.cpp's CPU flash attention is F16
            params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        if self.hook is not None:
            params.cb_eval = self.hook.callback
        with llama_log.collected() as log:
            ctx = llama_cpp.llama_init_from_model(self._model, params)
        if not ctx:
            out_of_memory = llama_log.out_of_memory(log)
            if out_of_memory:
                raise ModelError(f"a context of {n_ctx} tokens does not fit ({out_of_memory}); a smaller --ctx "
                                 f"may fit, or {self._fewer_layers_hint()}")
            raise ModelError(f"could not create a llama.cpp context of {n_ctx} tokens")
        return ctx

    def check_tokens(self, token_ids: Sequence[int], image: ImageSource | None) -> None:
        """A prompt's ids are the model's, and it has an image token exactly when it has an image."""
        if image is not None:
            self._require_vision()
        tokens = np.asarray(token_ids, dtype=np.int64)
        if tokens.size and (tokens.max() > self.image_token_id or tokens.min() < 0 or
                            (tokens.max() == self.image_token_id and self.vision is None)):
            raise ModelError("a token id is outside the model's vocabulary")
        has_token = self.image_token_id in token_ids
        if image is None and has_token:
            raise ModelError(f"the prompt has {IMAGE_TOKEN} but no image was given")
        if image is not None and not has_token:
            raise ModelError(f"an image was given but the prompt has no {IMAGE_TOKEN} token to bind it to")

    def evaluate(self, ctx, runs: Sequence[tuple[int, int, Sequence[int], bool]]) -> list[int]:
        """One llama_decode of runs of rows, each (sequence, first position, ids, whether its last row gives
        logits); returns, per run, the batch index of that row (-1 where none), for `sample` or logits."""
        n_rows = sum(len(ids) for _, _, ids, _ in runs)
        tokens, positions = np.empty(n_rows, np.int32), np.empty(n_rows, np.int32)
        sequences, outputs = np.empty(n_rows, np.int32), np.zeros(n_rows, bool)
        batch, at, indices = llama_cpp.llama_batch_init(n_rows, 0, 1), 0, []
        try:
            for sequence, start, ids, logits in runs:
                for i, token in enumerate(ids):
                    batch.token[at] = 0 if token == self.image_token_id else int(token)   # a placeholder id
                    batch.pos[at] = positions[at] = start + i
                    batch.n_seq_id[at] = 1
                    batch.seq_id[at][0] = sequences[at] = sequence
                    batch.logits[at] = outputs[at] = logits and i == len(ids) - 1
                    tokens[at] = token
                    at += 1
                indices.append(at - 1 if logits else -1)
            batch.n_tokens = n_rows
            if self.hook is not None:
                self.hook.error = None
                self.hook.prepare(Batch(tokens, positions, sequences, outputs))
            status = llama_cpp.llama_decode(ctx, batch)
            if self.hook is not None and self.hook.error is not None:
                if isinstance(self.hook.error, ggml.DeviceError):
                    raise ModelError(f"a cross-attention layer cannot run: {self.hook.error}") from None
                raise self.hook.error
            if status != 0:
                raise ModelError(f"llama.cpp could not evaluate the prompt (status {status}; context full?)")
        finally:
            llama_cpp.llama_batch_free(batch)
        return indices

    def row_logits(self, ctx, index: int) -> np.ndarray:
        """float32 [n_vocab]: the logits of batch row `index` of the last evaluation."""
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, index), shape=(self.n_vocab,)).copy()

    def forget(self, ctx, sequence: int, keep: int) -> None:
        """Drop a sequence's cells from position `keep` on."""
        llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(ctx), sequence, keep, -1)

    def bind_image(self, sequence: int, image: ImageKV | None, image_start: int | None = None) -> None:
        """What `sequence` sees from position `image_start` on (None: no image)."""
        if self.hook is not None:
            self.hook.bind(sequence, image, image_start)

    def new_sampler(self, params: SamplingParams):
        """A llama.cpp sampler chain; the caller frees it (llama_sampler_free)."""
        return sampler_chain(self.vocab, self.n_vocab, params)

    def sample(self, sampler, ctx, index: int) -> int:
        """The next id from batch row `index`'s logits (the sampler accepts it)."""
        return llama_cpp.llama_sampler_sample(sampler, ctx, index)

    # ------------------------------------------------------------------------------------------ one sequence

    def _bind(self, token_ids: Sequence[int], image: ImageSource | None,
              progress: Progress | None) -> str | None:
        """Encode the image (if any) and bind it where the sequence starts seeing it; the image's key."""
        self.check_tokens(token_ids, image)
        if image is None:
            self.bind_image(SOLO, None)
            return None
        key, kv = self.encode_image(image, progress)
        self.bind_image(SOLO, kv, list(token_ids).index(self.image_token_id))
        return key

    def _decode(self, ctx, token_ids: Sequence[int], start: int, outputs: np.ndarray,
                on_logits: Callable[[np.ndarray, np.ndarray], None] | None = None) -> None:
        """Evaluate `token_ids` at positions start.. in batches of n_batch; `on_logits(rows, logits)` per batch."""
        n_batch = min(self.n_batch, llama_cpp.llama_n_batch(ctx))
        for first in range(0, len(token_ids), n_batch):
            chunk, wanted = list(token_ids[first:first + n_batch]), outputs[first:first + n_batch]
            runs = [(SOLO, start + first + i, [token], bool(w)) for i, (token, w) in enumerate(zip(chunk, wanted))]
            indices = [i for i in self.evaluate(ctx, runs) if i >= 0]
            if on_logits is not None and indices:
                logits = np.stack([self.row_logits(ctx, i) for i in indices])
                on_logits(np.flatnonzero(wanted) + first, logits)

    def logits(self, token_ids: Sequence[int], image: ImageSource | None = None) -> np.ndarray:
        """float32 [len(token_ids), n_vocab]: every position, from a fresh context."""
        self._bind(token_ids, image, None)
        out = np.empty((len(token_ids), self.n_vocab), dtype=np.float32)

        def keep(rows: np.ndarray, logits: np.ndarray) -> None:
            out[rows] = logits

        ctx = self.new_context(max(256, -(-len(token_ids) // 256) * 256))
        try:
            self._decode(ctx, token_ids, 0, np.ones(len(token_ids), dtype=bool), keep)
        finally:
            llama_cpp.llama_free(ctx)
        return out

    def _prefill(self, token_ids: Sequence[int], image_key: str | None) -> np.ndarray:
        """Bring the kept context to `token_ids`, reusing the longest valid prefix; the last row's logits."""
        if len(token_ids) > self.n_ctx:
            raise ModelError(f"the prompt has {len(token_ids)} tokens; the context holds {self.n_ctx}")
        if self._ctx is None:
            self._ctx = self.new_context(self.n_ctx)
            self._ctx_tokens, self._ctx_image = [], None
        keep = reusable_prefix(self._ctx_tokens, self._ctx_image, token_ids, image_key, self.image_token_id)
        self.forget(self._ctx, SOLO, keep)
        self._ctx_tokens, self._ctx_image = self._ctx_tokens[:keep], image_key
        last: list[np.ndarray] = []
        outputs = np.zeros(len(token_ids) - keep, dtype=bool)
        outputs[-1] = True
        self._decode(self._ctx, token_ids[keep:], keep, outputs, lambda rows, logits: last.append(logits[-1]))
        self.prompt_tokens_evaluated = len(token_ids) - keep
        self._ctx_tokens = list(token_ids)
        return last[-1]

    def next_token_logits(self, token_ids: Sequence[int], image: ImageSource | None = None) -> np.ndarray:
        """float32 [n_vocab] after `token_ids`, evaluated in the kept context: only what it lacks is evaluated."""
        image_key = self._bind(token_ids, image, None)
        return self._prefill(list(token_ids), image_key)

    def generate_tokens(self, token_ids: Sequence[int], image: ImageSource | None = None, max_tokens: int = 512,
                        temperature: float = 0.6, top_p: float = 0.9, top_k: int = 40, min_p: float = 0.05,
                        repeat_penalty: float = 1.0, repeat_last_n: int = 64, seed: int | None = None,
                        grammar: str | None = None, stop_at_end_of_turn: bool = True,
                        progress: Progress | None = None) -> Generator[int, None, None]:
        """Sampled token ids, one at a time, with llama.cpp's samplers (`SamplingParams`)."""
        if not token_ids:
            raise ModelError("the prompt is empty")
        image_key = self._bind(token_ids, image, progress)
        sampler = self.new_sampler(SamplingParams(temperature, top_p, top_k, min_p, repeat_penalty, repeat_last_n,
                                                  seed, grammar))
        try:
            self._prefill(list(token_ids), image_key)
            for _ in range(max_tokens):
                token = self.sample(sampler, self._ctx, -1)
                if stop_at_end_of_turn and self.is_end_of_turn(token):
                    return
                yield token
                if len(self._ctx_tokens) >= self.n_ctx:
                    return
                self._decode(self._ctx, [token], len(self._ctx_tokens), np.ones(1, dtype=bool))
                self._ctx_tokens.append(token)
        finally:
            llama_cpp.llama_sampler_free(sampler)

    def generate(self, token_ids: Sequence[int], image: ImageSource | None = None, max_tokens: int = 512,
                 stop: Sequence[str] = (), on_token: Callable[[int], None] | None = None,
                 on_evaluated: Callable[[int], None] | None = None, **sampling) -> Iterator[str]:
        """Text pieces as they are sampled; a piece never splits a UTF-8 character or shows part of a stop string.

        `on_token` sees every sampled id (the end-of-turn token excepted), for callers that keep the ids;
        `on_evaluated` how many prompt ids were evaluated (what the KV cache did not already hold).
        """
        tokens = self.generate_tokens(token_ids, image, max_tokens=max_tokens, **sampling)
        try:
            yield from text_of(tokens, self.token_bytes, stop, on_token)
        finally:
            tokens.close()
            if on_evaluated:
                on_evaluated(self.prompt_tokens_evaluated)

    def close(self) -> None:
        if self._ctx is not None:
            llama_cpp.llama_free(self._ctx)
            self._ctx = None
        if self.images:
            self.images.close()
        if self.hook:
            self.hook.close()
        if self._scratch:
            self._scratch.close()
        if self.vision:
            self.vision.close()
        if self._model:
            llama_cpp.llama_model_free(self._model)
            self._model = None
        for backend in self._backends.values():
            backend.close()
        self._backends.clear()


def reusable_prefix(kept: Sequence[int], kept_image: str | None, token_ids: Sequence[int], image_key: str | None,
                    image_token_id: int) -> int:
    """How many of the kept ids a new prompt can keep in the KV cache: the longest shared prefix (less the
    last id, whose logits are needed), and with another image only the rows before the image token."""
    keep = 0
    for old, new in zip(kept, token_ids[:-1]):
        if old != new:
            break
        keep += 1
    if image_key != kept_image and image_token_id in kept[:keep]:
        keep = list(kept).index(image_token_id)
    return keep


def load_model(text_gguf: str | os.PathLike, vision_gguf: str | os.PathLike | None = None, n_ctx: int = 4096,
               n_threads: int | None = None, kv_cache_type: str | None = None, n_batch: int = 512,
               n_ubatch: int | None = None, progress: Progress | None = None,
               feature_cache: FeatureStore | None = None, n_gpu_layers: int = ALL_LAYERS,
               rpc_servers: Sequence[str] = (), kernel_paths: Paths | None = None) -> MllamaModel:
    """Load a converted pair; the vision file is found beside the text file when not given.

    `kv_cache_type` (f32, f16, q8_0) follows the text weights unless given: F32 for an F32 file, else F16.
    `n_gpu_layers`: text layers llama.cpp offloads to the GPUs (the last ones; -1: all, 0: none; the output
    layer counts as one); lva's cross layers follow them (placement.py). `rpc_servers`: HOST:PORT of ggml
    RPC servers whose devices join the offload devices, ahead of this machine's GPUs. `kernel_paths`: the
    paths of lva's CPU kernels to run, instead of those measured fastest on this machine (benchmarks, tests).
    """
    text_path = Path(text_gguf)
    vision_path = Path(vision_gguf) if vision_gguf is not None else find_vision_file(text_path)
    return MllamaModel(text_path, vision_path, n_ctx=n_ctx, n_threads=n_threads, kv_cache_type=kv_cache_type,
                       n_batch=n_batch, n_ubatch=n_ubatch, progress=progress, feature_cache=feature_cache,
                       n_gpu_layers=n_gpu_layers, rpc_servers=rpc_servers, kernel_paths=kernel_paths)
