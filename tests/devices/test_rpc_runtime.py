"""The runtime on a device whose memory is not this process's: ggml's RPC backend (see conftest.py).

Each test runs the golden fixtures (F32 files, F32 KV cache) with weights, activations, the hook's `l_out`
rows and image K/V on RPC devices, and checks two things:
- the reference, under the parity bound of tests/test_runtime_parity.py (2e-3, same argmax);
- the CPU path in the same process, bit for bit: the server runs the same CPU kernels, so any difference
  would be lva's doing (a row lost crossing the socket, a layer skipped, a stale K/V).
Measured on the development machine (AMD EPYC, AVX-512), max |logit - reference| over every case:
tiny-a 1.9e-5, tiny-b 2.1e-5, tiny-c 2.1e-5, the same as on the CPU; difference from the CPU path: 0.0,
for full, partial and no offload, one or two servers, small ubatches and KV reuse. An F16 vision tower on
the device (ggml's flash attention; the CPU takes our own kernel instead): 0.020, under the 0.03 bound of
that path.
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

from assistant import load_model
from assistant.chat.feature_cache import FeatureCache
from convert.pipeline import convert
from models import ggml
from models.kernels.paths import GGML_PATHS
from tests.devices.conftest import FIXTURES, Fixture, image_path
from tests.synthetic_checkpoint import small_config, write_checkpoint
from tests.test_runtime import HALF_VISION_BOUNDS

LOGITS_TOLERANCE = 2e-3          # tests/test_runtime_parity.py's bound: the device is held to the CPU's standard
CONFIGS = ["tiny-a", "tiny-b", "tiny-c"]
IMAGES = FIXTURES / "images"


def load(fixture: Fixture, **options):
    return load_model(fixture.text, n_ctx=512, kv_cache_type="f32", **options)


_cpu_logits: dict[tuple, dict[str, np.ndarray]] = {}


def cpu_logits(fixture: Fixture, case: dict, **options) -> np.ndarray:
    """The same case on the CPU alone (nothing offloaded); every case of a configuration is run once."""
    key = (fixture.name, tuple(sorted(options.items())))
    if key not in _cpu_logits:
        model = load(fixture, n_gpu_layers=0, **options)
        try:
            _cpu_logits[key] = {c["name"]: model.logits(c["token_ids"], image_path(c)) for c in fixture.cases()}
        finally:
            model.close()
    return _cpu_logits[key][case["name"]]


def check_case(model, fixture: Fixture, case: dict) -> None:
    logits = model.logits(case["token_ids"], image_path(case))
    want = fixture.expected[f"logits/{case['name']}"]
    assert np.abs(logits - want).max() < LOGITS_TOLERANCE, case["name"]
    assert (logits.argmax(axis=1) == want.argmax(axis=1)).all(), case["name"]
    assert np.array_equal(logits, cpu_logits(fixture, case)), case["name"]


def expected_layer_devices(n_layer: int, n_gpu_layers: int, device: str) -> list[str]:
    """llama.cpp's rule for one device: the last n_gpu_layers of the n_layer + 1 (output last) are offloaded."""
    first = n_layer + 1 - n_gpu_layers if n_gpu_layers >= 0 else 0
    return ["CPU" if i < first else device for i in range(n_layer + 1)]


@pytest.mark.parametrize("config", CONFIGS)
def test_every_part_runs_on_the_rpc_device_and_matches_the_reference(fixtures, rpc_server, config: str) -> None:
    fixture = fixtures[config]
    model = load(fixture, rpc_servers=[rpc_server.endpoint])
    try:
        placement = model.placement
        assert set(placement.text_layers) == {rpc_server.device} and placement.output == rpc_server.device
        assert placement.vision == rpc_server.device
        assert ggml.device_of(model.vision.tower.layers[0].attn_q).name == rpc_server.device
        for index, layer in model.vision.cross_layers.items():
            assert ggml.device_of(layer.attn_q).name == placement.cross_layers[index]
            assert placement.cross_layers[index] == ("CPU" if index == 0 else rpc_server.device)
        for case in fixture.cases():
            check_case(model, fixture, case)
        _, kv = model.encode_image(IMAGES / "rgb_173x97.png")
        assert {i: ggml.device_of(t).name for i, t in kv.keys.items()} == placement.cross_layers
    finally:
        model.close()


@pytest.mark.parametrize("config", CONFIGS)
def test_greedy_generation_on_the_rpc_device_matches_the_reference(fixtures, rpc_server, config: str) -> None:
    fixture = fixtures[config]
    model = load(fixture, rpc_servers=[rpc_server.endpoint])
    try:
        for case in fixture.cases():
            tokens = list(model.generate_tokens(case["token_ids"], image_path(case), temperature=0.0,
                                                max_tokens=fixture.reference["num_greedy"], stop_at_end_of_turn=False))
            assert tokens == fixture.expected[f"greedy/{case['name']}"].tolist(), case["name"]
    finally:
        model.close()


@pytest.mark.parametrize("n_gpu_layers", [0, 2, 4, -1], ids=["none", "output+1", "output+3", "all"])
def test_partial_offload_keeps_every_layer_exact(fixtures, rpc_server, n_gpu_layers: int) -> None:
    """tiny-a: 4 self layers; cross layers 0 (on the embeddings), 3 and 4 (both after self layer 1)."""
    fixture = fixtures["tiny-a"]
    model = load(fixture, rpc_servers=[rpc_server.endpoint], n_gpu_layers=n_gpu_layers)
    try:
        placement = model.placement
        layers = expected_layer_devices(4, n_gpu_layers, rpc_server.device)
        assert [*placement.text_layers, placement.output] == layers
        assert placement.cross_layers == {0: "CPU", 3: layers[1], 4: layers[1]}
        assert placement.vision == ("CPU" if n_gpu_layers == 0 else rpc_server.device)
        for case in fixture.cases(with_image=True):
            check_case(model, fixture, case)
    finally:
        model.close()


def test_two_rpc_servers_split_the_layers_with_the_vision_tower_on_one(fixtures, rpc_server,
                                                                     second_rpc_server) -> None:
    fixture = fixtures["tiny-b"]             # cross layers after self layers 0 and 2
    model = load(fixture, rpc_servers=[rpc_server.endpoint, second_rpc_server.endpoint])
    try:
        placement = model.placement          # llama.cpp splits by the servers' free memory: about half each
        layers = placement.text_layers
        assert set(layers) == {rpc_server.device, second_rpc_server.device}
        assert layers[0] == placement.vision == rpc_server.device and placement.output == second_rpc_server.device
        assert placement.cross_layers == {1: layers[0], 4: layers[2]}
        for case in fixture.cases():
            check_case(model, fixture, case)
    finally:
        model.close()


def test_small_ubatches_on_the_device_give_the_cpu_logits(fixtures, rpc_server) -> None:
    fixture = fixtures["tiny-a"]
    case = next(c for c in fixture.cases() if c["name"].startswith("text_before_image.rgb_173x97"))
    model = load(fixture, rpc_servers=[rpc_server.endpoint], n_batch=8, n_ubatch=3)
    try:
        logits = model.logits(case["token_ids"], image_path(case))
        assert np.array_equal(logits, cpu_logits(fixture, case, n_batch=8, n_ubatch=3))
        assert np.abs(logits - fixture.expected[f"logits/{case['name']}"]).max() < LOGITS_TOLERANCE
    finally:
        model.close()


def test_the_kv_cache_is_reused_on_the_device(fixtures, rpc_server) -> None:
    fixture = fixtures["tiny-a"]
    case = next(c for c in fixture.cases() if c["name"].startswith("text_before_image.rgb_19x27"))
    ids, image = case["token_ids"], image_path(case)
    model = load(fixture, rpc_servers=[rpc_server.endpoint])
    try:
        first = list(model.generate_tokens(ids, image, max_tokens=4, temperature=0.0, stop_at_end_of_turn=False))
        assert model.prompt_tokens_evaluated == len(ids)
        longer = ids + first[:3]
        reused = model.next_token_logits(longer, image)
        assert model.prompt_tokens_evaluated == 1
        assert int(reused.argmax()) == first[3]
        # another batch shape than a fresh evaluation: test_runtime.py's bound for that (measured: 5.7e-6)
        assert np.abs(reused - model.logits(longer, image)[-1]).max() < 1e-4
        model.next_token_logits(ids, IMAGES / "rgb_80x26.png")
        assert model.prompt_tokens_evaluated == len(ids) - case["image_token_pos"]   # rows before the image kept
    finally:
        model.close()


def test_with_every_gate_closed_an_image_changes_nothing_on_the_device(tmp_path, rpc_server) -> None:
    checkpoint = write_checkpoint(tmp_path / "closed", small_config(), zero_cross_attention_gates=True)
    pair = convert(str(checkpoint), tmp_path / "out", quant="F32", progress=False)
    results = []
    for options in ({"rpc_servers": [rpc_server.endpoint]}, {"n_gpu_layers": 0}):
        model = load_model(pair.text, n_ctx=256, kv_cache_type="f32", **options)
        try:
            ids = model.tokenize("<|begin_of_text|>Look: <|image|>what is this?")
            results += [model.logits(ids, IMAGES / "rgb_173x97.png"), model.logits(ids, IMAGES / "rgb_80x26.png")]
        finally:
            model.close()
    assert all(np.array_equal(results[0], other) for other in results[1:])


def test_image_kv_from_the_feature_cache_goes_to_the_devices(fixtures, rpc_server) -> None:
    fixture = fixtures["tiny-a"]
    case = next(c for c in fixture.cases() if c["name"].startswith("text_before_image.rgb_173x97"))
    logits = []
    for _ in range(2):
        model = load(fixture, rpc_servers=[rpc_server.endpoint], n_gpu_layers=4, feature_cache=FeatureCache())
        try:
            logits.append(model.logits(case["token_ids"], image_path(case)))
            encoded = model.images_encoded
        finally:
            model.close()
    assert encoded == 0                                    # the second model read the cache
    assert np.array_equal(logits[0], logits[1])
    assert np.array_equal(logits[0], cpu_logits(fixture, case))


def test_an_f16_vision_tower_on_the_device_runs_ggml_flash_attention_not_the_cpu_kernel(fixtures, tmp_path,
                                                                                      rpc_server) -> None:
    """Our fused attention kernel and the BF16 copies are for the CPU; a device runs ggml's flash attention on
    the F16 weights, held to the bound measured for that path on the CPU (tests/test_runtime.py)."""
    fixture = fixtures["tiny-a"]
    pair = convert(str(FIXTURES / "mllama" / "tiny-a" / "checkpoint"), tmp_path, quant="F32", vision_quant="F16",
                   progress=False)
    model = load_model(pair.text, n_ctx=256, rpc_servers=[rpc_server.endpoint])
    try:
        tower = model.vision.tower
        assert model.placement.vision == rpc_server.device
        assert tower.paths == GGML_PATHS
        worst = 0.0
        for case in fixture.cases(with_image=True):
            logits = model.logits(case["token_ids"], image_path(case))
            worst = max(worst, float(np.abs(logits - fixture.expected[f"logits/{case['name']}"]).max()))
        assert worst < HALF_VISION_BOUNDS["F16", "ggml"]
        assert ggml.struct(tower.layers[0].attn_q).type == int(ggml.F16)
    finally:
        model.close()


CUSTOM1 = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p)


def run_custom_op(device: ggml.Device, kernel) -> None:
    """A one-node graph: ggml_map_custom1 with a kernel from this process, on a device."""
    map_custom1 = ggml._lib.ggml_map_custom1
    map_custom1.restype = ctypes.c_void_p
    map_custom1.argtypes = [ctypes.c_void_p, ctypes.c_void_p, CUSTOM1, ctypes.c_int, ctypes.c_void_p]
    backend = ggml.Backend(1, device)
    scratch, graph = ggml.Scratch(backend), ggml.Graph(16)
    try:
        x = graph.input(ggml.F32, 4, name="x")
        graph.output(map_custom1(graph.ctx, x, kernel, 1, None))
        scratch.run(graph, {x: np.zeros(4, dtype=np.float32)})
    finally:
        graph.close()
        scratch.close()
        backend.close()


def test_a_custom_cpu_op_is_refused_on_the_device_in_one_line(rpc_server) -> None:
    """lva's own CPU kernels are custom ops: function pointers into this process, which only its CPU can call.
    The RPC device claims every op, so the runtime itself must keep them off it."""
    calls: list[int] = []
    kernel = CUSTOM1(lambda dst, src, ith, nth, userdata: calls.append(ith))
    run_custom_op(ggml.cpu_device(), kernel)
    assert calls == [0]
    with pytest.raises(ggml.DeviceError, match=rf"^the ggml op MAP_CUSTOM1 is not supported on "
                                               rf"{rpc_server.device} \({rpc_server.endpoint}\)"):
        run_custom_op(ggml.device_named(rpc_server.device), kernel)
    assert calls == [0]
