"""`lva import`: models Ollama stored become lva pairs that match the references, bytes kept where they can be.

The Ollama files come from tests/ollama_store.py, which follows Ollama's Go converter and quantizer; the
references are the golden fixtures (tests/fixtures/README.md). Ollama's files carry no preprocessing
constants (its runtime always used CLIP's, which the import writes), while the tiny checkpoints use other
constants on purpose: comparisons with images give the imported model the checkpoint's constants.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import gguf
import llama_cpp
import numpy as np
import ollama
import pytest
from gguf import GGMLQuantizationType as T

from assistant import load_model
from assistant.store import resolve_model
from convert.ollama.importer import import_model, raw_gate
from convert.ollama.store import open_model
from convert.pipeline import convert
from models.mllama import gguf_keys as K
from models.mllama import weights as W
from models.mllama.hparams import ImagePreprocessing
from tests.kernel_paths import f32_paths, without_int8
from tests.conftest import run_lva
from tests.ollama_store import CONVERTERS, permute_heads, write_model, write_other_model
from tests.server.lva_server import LvaServer
from tests.synthetic_checkpoint import small_config, write_checkpoint
from tests.test_convert_bad_input import assert_one_line_error
from tests.test_runtime import QUANT_BOUNDS

FIXTURES = Path(__file__).parent / "fixtures"
IMAGES = FIXTURES / "images"
CONFIGS = sorted(p.name for p in (FIXTURES / "mllama").iterdir() if (p / "reference.json").is_file())
LOGITS_TOLERANCE = 2e-3
# Measured max |logit - reference| over every case of tiny-a / tiny-b, F16 Ollama files, the vision tower's
# ops on our kernels in F32 (tests.kernel_paths.f32_paths), so the error is the F16 weights' rounding (and the
# F16 image K/V's): 0.016 / 0.019 on the development machine (AMD EPYC, 2026-12-04). Before, with the paths
# each CPU chose by its flags: up to 0.088 (BF16 products). The bound is the one those had, kept.
F16_BOUND = 0.053
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]


def imported(root: Path, checkpoint: Path, converter: str, file_type: str):
    """The pair `lva import` writes from a store holding the checkpoint as Ollama's `converter` wrote it,
    and that store's model blob."""
    store = root / f"{converter}-{file_type}"
    blob = write_model(store, checkpoint, "llama3.2-vision:tiny", converter, file_type)
    return import_model(open_model("llama3.2-vision:tiny", [store]), root / "out", progress=False), blob


def with_checkpoint_preprocessing(model, checkpoint: Path):
    config = json.loads((checkpoint / "preprocessor_config.json").read_text())
    model.vision.hp = dataclasses.replace(model.vision.hp, preprocessing=ImagePreprocessing.from_hf(config))
    return model


def tensors(path: Path) -> dict[str, gguf.ReaderTensor]:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def fields(path: Path) -> dict:
    return {f.name: f.contents() for f in gguf.GGUFReader(path).fields.values()}


def reference(config: str) -> tuple[Path, dict, dict[str, np.ndarray]]:
    directory = FIXTURES / "mllama" / config
    with np.load(directory / "reference.npz") as arrays:
        expected = {key: arrays[key] for key in arrays.files}
    return directory / "checkpoint", json.loads((directory / "reference.json").read_text()), expected


def image_of(case: dict) -> Path | None:
    return None if case["image"] is None else IMAGES / case["image"]


# ------------------------------------------------------------------------------------------ exactness


# Every config in the registry's format (v0.7.1+); v0.7.0's on tiny-b, whose cross layers have 2 KV heads for 6.
@pytest.mark.parametrize("config, converter", [(c, "v0.7.1") for c in CONFIGS] + [("tiny-b", "v0.7.0")])
def test_an_f32_import_matches_the_reference_at_every_position(config: str, converter: str, tmp_path: Path) -> None:
    checkpoint, ref, expected = reference(config)
    pair, _ = imported(tmp_path, checkpoint, converter, "F32")
    assert pair.converter.version.startswith(converter)
    model = with_checkpoint_preprocessing(load_model(pair.text, n_ctx=512, kv_cache_type="f32"), checkpoint)
    try:
        assert model.image_token_id == ref["image_token_id"]
        for case in ref["cases"]:
            assert model.tokenize(case["prompt"], add_bos=case["add_bos"]) == case["token_ids"], case["name"]
            logits = model.logits(case["token_ids"], image_of(case))
            want = expected[f"logits/{case['name']}"]
            assert np.abs(logits - want).max() < LOGITS_TOLERANCE, case["name"]
            assert (logits.argmax(axis=1) == want.argmax(axis=1)).all(), case["name"]
    finally:
        model.close()


@pytest.mark.parametrize("converter", CONVERTERS)
def test_an_f32_import_equals_lva_convert_tensor_for_tensor(converter: str, tmp_path: Path) -> None:
    """Same names, types, shapes and bytes as a conversion of the checkpoint; the gates, which went through
    Ollama's tanh and back, give the same tanh within one float32 step."""
    checkpoint = FIXTURES / "mllama" / "tiny-a" / "checkpoint"
    pair, _ = imported(tmp_path, checkpoint, converter, "F32")
    converted = convert(str(checkpoint), tmp_path / "converted", quant="F32", progress=False)
    for ours, theirs in ((pair.text, converted.text), (pair.vision, converted.vision)):
        got, want = tensors(ours), tensors(theirs)
        assert sorted(got) == sorted(want)
        for name, t in want.items():
            assert (got[name].tensor_type, got[name].shape.tolist()) == (t.tensor_type, t.shape.tolist()), name
            if name.endswith(("gate", "_gate")) and t.n_elements == 1:
                tanh = lambda x: np.tanh(np.asarray(x.data, dtype=np.float32))  # noqa: E731
                assert np.abs(tanh(got[name]) - tanh(t)).max() <= 6e-8, name
            elif name != "rope_freqs.weight":      # Ollama's own float32 arithmetic: compared below
                assert np.array_equal(np.asarray(got[name].data), np.asarray(t.data)), name
        if "rope_freqs.weight" in want:
            assert np.allclose(got["rope_freqs.weight"].data, want["rope_freqs.weight"].data, rtol=1e-6)


@pytest.mark.parametrize("config", ["tiny-a", "tiny-b"])
def test_an_f16_import_stays_within_its_bound(config: str, tmp_path: Path) -> None:
    checkpoint, ref, expected = reference(config)
    pair, _ = imported(tmp_path, checkpoint, "v0.7.1", "F16")
    model = with_checkpoint_preprocessing(load_model(pair.text, n_ctx=512, kv_cache_type="f32",
                                                     kernel_paths=f32_paths()), checkpoint)
    try:
        for case in ref["cases"]:
            error = np.abs(model.logits(case["token_ids"], image_of(case)) - expected[f"logits/{case['name']}"])
            assert error.max() < F16_BOUND, case["name"]
    finally:
        model.close()


def test_stock_llama_cpp_runs_the_imported_text_file_like_the_reference(tmp_path: Path) -> None:
    checkpoint, ref, expected = reference("tiny-a")
    pair, _ = imported(tmp_path, checkpoint, "v0.7.1", "F32")
    model = llama_cpp.Llama(str(pair.text), n_ctx=512, logits_all=True, verbose=False,
                            type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    case = next(c for c in ref["cases"] if c["name"] == "text_plain")
    assert model.tokenize(case["prompt"].encode(), add_bos=True, special=True) == case["token_ids"]
    model.eval(case["token_ids"])
    logits = np.asarray(model.scores[: len(case["token_ids"])])
    assert np.abs(logits - expected["logits/text_plain"]).max() < LOGITS_TOLERANCE
    greedy = []
    for _ in range(ref["num_greedy"]):
        greedy.append(int(np.argmax(model.scores[model.n_tokens - 1])))
        model.eval([greedy[-1]])
    assert greedy == expected["greedy/text_plain"].tolist()


# ------------------------------------------------------------------------------------------ named by the tensors


def test_an_f32_store_marked_f16_as_ollama_marks_it_imports_as_f32_and_runs_as_the_converted_pair(
        tmp_path: Path) -> None:
    """Ollama writes general.file_type 1 (F16) whatever the tensors: the import names and marks the pair by its
    tensors, and the runtime gives it the F32 KV cache an F32 pair is exact with (an F16 cache moved these
    logits by 4.9e-3, over the bound)."""
    checkpoint, ref, _ = reference("tiny-a")
    pair, blob = imported(tmp_path, checkpoint, "v0.7.1", "F32")
    assert fields(blob)["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    assert (pair.text.name, pair.vision.name) == ("llama3.2-vision-tiny-text-F32.gguf",
                                                  "llama3.2-vision-tiny-vision-F32.gguf")
    assert fields(pair.text)["general.file_type"] == gguf.LlamaFileType.ALL_F32
    assert fields(pair.vision)[K.QUANT] == "F32"
    converted = convert(str(checkpoint), tmp_path / "converted", quant="F32", progress=False)
    ours = with_checkpoint_preprocessing(load_model(pair.text, n_ctx=512), checkpoint)
    theirs = load_model(converted.text, n_ctx=512)
    try:
        assert ours.kv_cache_type == theirs.kv_cache_type == llama_cpp.GGML_TYPE_F32
        for case in ref["cases"]:
            got, want = (m.logits(case["token_ids"], image_of(case)) for m in (ours, theirs))
            assert np.abs(got - want).max() < LOGITS_TOLERANCE, case["name"]
    finally:
        ours.close()
        theirs.close()


def test_a_bf16_store_marked_f16_is_named_bf16_and_its_text_file_is_lva_converts(tmp_path: Path) -> None:
    """Since v0.12.0 Ollama keeps a BF16 checkpoint's text matrices BF16 (the vision tower F16) and still marks
    the file F16. The text file is `lva convert --quant BF16`'s, byte for byte (RoPE factors: Ollama's float32
    arithmetic)."""
    checkpoint = FIXTURES / "mllama" / "tiny-a" / "checkpoint"
    pair, blob = imported(tmp_path, checkpoint, "v0.7.1", "BF16")
    source = tensors(blob)
    assert fields(blob)["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    assert source["output.weight"].tensor_type == T.BF16 and source["mm.0.weight"].tensor_type == T.F16
    assert pair.text.name == "llama3.2-vision-tiny-text-BF16.gguf"
    assert fields(pair.text)["general.file_type"] == gguf.LlamaFileType.MOSTLY_BF16
    assert fields(pair.vision)[K.QUANT] == "BF16"
    converted = convert(str(checkpoint), tmp_path / "converted", quant="BF16", progress=False)
    got, want = tensors(pair.text), tensors(converted.text)
    assert sorted(got) == sorted(want)
    for name, t in want.items():
        assert got[name].tensor_type == t.tensor_type, name
        if name != "rope_freqs.weight":
            assert np.array_equal(np.asarray(got[name].data), np.asarray(t.data)), name
    model = load_model(pair.text, n_ctx=256)
    try:
        assert model.kv_cache_type == llama_cpp.GGML_TYPE_F16             # only F32 weights get an F32 cache
    finally:
        model.close()


def as_an_older_import_wrote_it(pair, directory: Path) -> Path:
    """The pair as `lva import` wrote it while it took the type from Ollama's general.file_type: named F16 and
    marked general.file_type 1 whatever its tensors. Returns the text file, moved into `directory`."""
    reader = gguf.GGUFReader(pair.text, "r+")
    field = reader.get_field("general.file_type")
    field.parts[field.data[0]][0] = gguf.LlamaFileType.MOSTLY_F16
    reader.data.flush()
    del reader, field
    directory.mkdir(parents=True, exist_ok=True)
    for path in (pair.vision, pair.text):
        moved = directory / path.name.replace("-F32.gguf", "-F16.gguf")
        shutil.move(path, moved)
    return moved


def test_a_pair_an_older_import_named_f16_is_listed_served_and_run_as_the_f32_it_holds(tmp_path: Path,
                                                                                     lva_home: Path) -> None:
    pair, _ = imported(tmp_path, FIXTURES / "mllama" / "tiny-a" / "checkpoint", "v0.7.1", "F32")
    text = as_an_older_import_wrote_it(pair, lva_home / "models")
    assert text.name == "llama3.2-vision-tiny-text-F16.gguf" and fields(text)["general.file_type"] == 1

    listing = run_lva("models")
    assert listing.returncode == 0, listing.stderr
    (row,) = [line.split() for line in listing.stdout.splitlines() if line.startswith("llama3.2-vision-tiny ")]
    assert row[1] == "F32"
    assert resolve_model("llama3.2-vision-tiny-F32") == resolve_model("llama3.2-vision-tiny-F16") == text
    model = load_model(text, n_ctx=256)
    try:
        assert model.kv_cache_type == llama_cpp.GGML_TYPE_F32
    finally:
        model.close()

    with LvaServer(lva_home) as server:
        client = ollama.Client(host=server.url)
        (listed,) = client.list().models
        assert listed.model == "llama3.2-vision-tiny-F32" and listed.details.quantization_level == "F32"
        shown = client.show("llama3.2-vision-tiny")
        assert shown.details.quantization_level == "F32"
        assert shown.modelinfo["general.file_type"] == gguf.LlamaFileType.ALL_F32


# ------------------------------------------------------------------------------------------ quantized files


@pytest.fixture(scope="module")
def checkpoint_520(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """checkpoint_256's widths with a vocabulary without unused ids, as Llama 3's: Ollama's converter packs
    token ids in order, so a vocabulary with a gap before the special tokens would come out shifted."""
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-520", small_config(vocab_size=520))


def image_prompt_logits(text: Path, checkpoint: Path | None = None) -> np.ndarray:
    model = load_model(text, n_ctx=256, kernel_paths=without_int8())
    try:
        if checkpoint is not None:
            with_checkpoint_preprocessing(model, checkpoint)
        ids = model.tokenize("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<|image|>Describe it.")
        return model.logits(ids, IMAGES / "rgb_173x97.png")
    finally:
        model.close()


def lva_tensor_of(config: dict) -> dict[str, tuple[str, str, int | None]]:
    """Ollama's tensor name -> (lva file, lva name, heads its rows were permuted with by a v0.7.1 converter)."""
    text, vision = config["text_config"], config["vision_config"]
    cross = text["cross_attention_layers"]
    self_layers = [i for i in range(text["num_hidden_layers"]) if i not in cross]
    vision_heads = {"attn_q": vision["attention_heads"], "attn_k": vision["attention_heads"]}
    blocks = [("text", W.TextModel, ("", "", ""), {}), ("vision", W.VisionEmbeddings, ("", "", ""), {}),
              ("vision", W.Projector, ("", "", ""), {})]
    blocks += [("text", W.SelfAttentionLayer, (*W.self_attention_prefixes(j, i), W.ollama_text_layer_prefix(i)), {})
               for j, i in enumerate(self_layers)]
    blocks += [("vision", W.CrossAttentionLayer, (*W.cross_attention_prefixes(i), W.ollama_text_layer_prefix(i)),
                {"attn_q": text["num_attention_heads"], "attn_k": text["num_key_value_heads"]}) for i in cross]
    blocks += [("vision", W.VisionLayer, (*W.vision_layer_prefixes(i), W.vision_layer_prefixes(i)[0]), vision_heads)
               for i in range(vision["num_hidden_layers"])]
    blocks += [("vision", W.GlobalVisionLayer, (*W.global_vision_layer_prefixes(i),
                                                W.global_vision_layer_prefixes(i)[0]), vision_heads)
               for i in range(vision["num_global_layers"])]
    return {name.ollama: (tower, name.gguf, heads.get(name.field))
            for tower, block, prefixes, heads in blocks for name in W.names(block, *prefixes)}


@pytest.mark.parametrize("file_type", sorted(QUANT_BOUNDS))
def test_a_quantized_import_keeps_every_quantized_byte_and_its_bound(file_type: str, checkpoint_520: Path,
                                                                     tmp_path: Path) -> None:
    pair, blob = imported(tmp_path, checkpoint_520, "v0.7.1", file_type)
    lva_tensor = lva_tensor_of(json.loads((checkpoint_520 / "config.json").read_text()))
    ours = {"text": tensors(pair.text), "vision": tensors(pair.vision)}
    quantized = [t for t in gguf.GGUFReader(blob).tensors if t.tensor_type not in (T.F32, T.F16)]
    assert {t.tensor_type for t in quantized} >= ({T.Q8_0} if file_type == "Q8_0" else {T.Q4_K, T.Q6_K})
    for t in quantized:
        tower, name, heads = lva_tensor[t.name]
        rows = np.asarray(ours[tower][name].data)
        assert ours[tower][name].tensor_type == t.tensor_type, t.name
        if heads is not None:                   # back to the order Ollama's converter wrote them in
            rows = permute_heads(rows, heads)
        assert np.array_equal(rows, np.asarray(t.data)[: len(rows)]), t.name    # token_embd: the text rows

    exact = convert(str(checkpoint_520), tmp_path / "f32", quant="F32", progress=False)
    error = np.abs(image_prompt_logits(pair.text, checkpoint_520) - image_prompt_logits(exact.text)).max()
    assert error < QUANT_BOUNDS[file_type]

    model = llama_cpp.Llama(str(pair.text), n_ctx=128, verbose=False)
    out = model("Hello the world", max_tokens=6, temperature=0.0)
    assert out["usage"]["completion_tokens"] >= 1


# ------------------------------------------------------------------------------------------ metadata


def test_the_files_say_where_they_came_from_and_which_converter_wrote_them(tmp_path: Path) -> None:
    pair, blob = imported(tmp_path, FIXTURES / "mllama" / "tiny-c" / "checkpoint", "v0.7.1", "F16")
    text, vision = fields(pair.text), fields(pair.vision)
    digest = blob.name.replace("sha256-", "sha256:")
    assert text[K.OLLAMA_MODEL] == vision[K.OLLAMA_MODEL] == f"registry.ollama.ai/library/llama3.2-vision:tiny@{digest}"
    assert vision[K.OLLAMA_CONVERTER].startswith("v0.7.1+: it has tokenizer.ggml.eos_token_ids")
    assert text[K.PAIR_ID] == vision[K.PAIR_ID] and vision[K.TEXT_FILE] == pair.text.name
    assert text["general.architecture"] == "llama" and vision["general.architecture"] == K.ARCHITECTURE
    assert vision[K.QUANT] == "F16" and pair.text.name == "llama3.2-vision-tiny-text-F16.gguf"
    assert vision[K.PREPROCESS_IMAGE_MEAN] == pytest.approx(CLIP_MEAN)         # what Ollama's runtime used
    assert text["tokenizer.ggml.add_bos_token"] is True                        # Ollama's file says False
    assert len(text["tokenizer.ggml.tokens"]) == 556 and "<|image|>" not in text["tokenizer.ggml.tokens"]


def test_the_chat_template_is_the_ggufs_own_or_else_the_published_one(tmp_path: Path) -> None:
    checkpoint = FIXTURES / "mllama" / "tiny-b" / "checkpoint"
    with_template, _ = imported(tmp_path / "with", checkpoint, "v0.7.1", "F16")
    without = tmp_path / "checkpoint-without-template"
    shutil.copytree(checkpoint, without)
    tokenizer_config = json.loads((without / "tokenizer_config.json").read_text())
    published = tokenizer_config.pop("chat_template")       # the fixtures carry Meta's published template
    (without / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    plain, _ = imported(tmp_path / "without", without, "v0.7.1", "F16")

    assert with_template.chat_template_source == "ollama-gguf"
    assert plain.chat_template_source == "llama-3.2-vision-instruct"
    assert fields(plain.text)[K.CHAT_TEMPLATE_SOURCE] == "llama-3.2-vision-instruct"
    assert fields(plain.text)["tokenizer.chat_template"] == published


def test_lva_import_lists_the_mllama_models_then_imports_one_into_the_store(tmp_path: Path, lva_home: Path) -> None:
    store = tmp_path / "ollama"
    write_model(store, FIXTURES / "mllama" / "tiny-b" / "checkpoint", "llama3.2-vision:tiny", "v0.7.1", "F16")
    text_only = convert(str(FIXTURES / "mllama" / "tiny-b" / "checkpoint"), tmp_path / "llama", quant="F16",
                        progress=False).text
    write_other_model(store, "llama3.2:1b", text_only, ["llama"])
    env = {"OLLAMA_MODELS": str(store)}

    listing = run_lva("import", env=env)
    assert listing.returncode == 0, listing.stderr
    assert "llama3.2-vision:tiny" in listing.stdout and "lva import llama3.2-vision:tiny" in listing.stdout
    assert "llama3.2:1b" not in listing.stdout

    result = run_lva("import", "llama3.2-vision:tiny", env=env)
    assert result.returncode == 0, result.stderr
    models = lva_home / "models"
    assert result.stdout.split() == [str(models / "llama3.2-vision-tiny-text-F16.gguf"),
                                     str(models / "llama3.2-vision-tiny-vision-F16.gguf")]
    assert "v0.7.1+" in result.stderr
    assert "llama3.2-vision-tiny" in run_lva("models").stdout

    again = run_lva("import", "llama3.2-vision:tiny", env=env)
    assert_one_line_error(again, "llama3.2-vision-tiny-text-F16.gguf already exists", "--force")
    assert run_lva("import", "llama3.2-vision:tiny", "--force", env=env).returncode == 0


def test_a_gate_stored_through_tanh_comes_back_with_the_same_tanh_within_one_float32_step() -> None:
    """Ollama stored float32 tanh(g); the import writes g' = arctanh, the runtime computes float32 tanh(g')."""
    raw = np.random.default_rng(0).uniform(-12, 12, 200_000).astype(np.float32)
    stored = np.tanh(raw.astype(np.float64)).astype(np.float32)        # saturated to ±1 beyond |g| ~ 9
    back = np.tanh(np.asarray([raw_gate(float(t)) for t in stored], dtype=np.float32))
    assert np.all(np.isfinite(back))
    assert np.abs(back.astype(np.float64) - stored).max() <= float(np.spacing(np.float32(1)) / 2)
