"""assistant/images.py: HF-equal preprocessing on the golden fixtures, odd image kinds, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from assistant.images import ImageError, PreprocessedImage, content_id, load_image, preprocess
from models.mllama.hparams import ImagePreprocessing, VisionHParams

FIXTURES = Path(__file__).parent / "fixtures"
IMAGES = FIXTURES / "images"
CONFIGS = ["tiny-a", "tiny-b", "tiny-c"]


def _reference(config: str) -> tuple[dict, np.lib.npyio.NpzFile, ImagePreprocessing, VisionHParams]:
    directory = FIXTURES / "mllama" / config
    checkpoint = directory / "checkpoint"
    reference = json.loads((directory / "reference.json").read_text())
    p = ImagePreprocessing.from_hf(json.loads((checkpoint / "preprocessor_config.json").read_text()))
    vision = VisionHParams.from_hf(json.loads((checkpoint / "config.json").read_text())["vision_config"])
    return reference, np.load(directory / "reference.npz"), p, vision


def _preprocess(image: Image.Image, config: str = "tiny-a") -> PreprocessedImage:
    _, _, p, vision = _reference(config)
    return preprocess(image, p, vision.image_size, vision.max_num_tiles, vision.supported_aspect_ratios)


def _cases() -> list[tuple[str, str]]:
    return [(config, name) for config in CONFIGS for name in _reference(config)[0]["images"]]


@pytest.mark.parametrize(("config", "name"), _cases())
def test_preprocessing_equals_hf_on_the_golden_images(config: str, name: str) -> None:
    reference, arrays, p, vision = _reference(config)
    expected = reference["images"][name]
    image = load_image(IMAGES / name)
    assert (image.mode, list(image.size)) == (expected["mode"], expected["size"])

    out = preprocess(image, p, reference["tile_size"], reference["max_num_tiles"], vision.supported_aspect_ratios)

    reference_pixels = arrays[f"pixels/{name}"]
    assert out.pixels.dtype == np.float32 and out.pixels.shape == reference_pixels.shape
    np.testing.assert_allclose(out.pixels, reference_pixels, rtol=0, atol=1e-4)
    assert out.aspect_ratio_id == expected["aspect_ratio_id"]
    assert out.num_tiles == expected["num_tiles"]
    assert list(out.tiles) == expected["tiles"]
    assert not out.pixels[out.num_tiles:].any()


def test_aspect_ratios_other_than_hfs_list_are_refused() -> None:
    """HF numbers the grids from get_all_supported_aspect_ratios(max tiles); a different list cannot match it."""
    _, _, p, vision = _reference("tiny-a")
    with pytest.raises(ValueError, match="supported_aspect_ratios"):
        preprocess(load_image(IMAGES / "rgb_80x26.png"), p, vision.image_size, 4, [(1, 1), (2, 2)])


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6                    # Orientation: rotate 90 degrees clockwise to display
    image = Image.new("RGB", (40, 20), (200, 30, 30))
    image.paste((30, 30, 200), (0, 0, 10, 20))  # a blue strip on the left edge...
    image.save(path, exif=exif.tobytes())

    loaded = load_image(path)

    assert loaded.size == (20, 40)
    assert loaded.getpixel((10, 2))[2] > 150      # ...is on top once upright
    assert loaded.getexif().get(0x0112) is None


def _roundtrip(image: Image.Image, path: Path, **save_args: object) -> Image.Image:
    image.save(path, **save_args)
    return load_image(path)


def _gradient(width: int = 61, height: int = 37) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // (width - 1), y * 255 // (height - 1), (x + y) * 7 % 256], -1).astype(np.uint8)


def test_a_cmyk_jpeg_preprocesses(tmp_path: Path) -> None:
    image = _roundtrip(Image.fromarray(_gradient()).convert("CMYK"), tmp_path / "cmyk.jpg")
    assert image.mode == "CMYK"
    assert np.isfinite(_preprocess(image).pixels).all()


def test_a_16_bit_png_preprocesses(tmp_path: Path) -> None:
    image = _roundtrip(Image.fromarray(_gradient()[..., 0].astype(np.uint16) * 257), tmp_path / "deep.png")
    assert image.mode == "I;16"
    assert np.isfinite(_preprocess(image).pixels).all()


def test_a_palette_png_with_transparency_is_composited_on_white(tmp_path: Path) -> None:
    rgb = Image.fromarray(_gradient())
    rgb.paste((0, 255, 0), (0, 0, 20, 20))           # a block whose palette entry will be transparent
    palette_image = rgb.convert("P")
    transparent_index = palette_image.getpixel((0, 0))
    image = _roundtrip(palette_image, tmp_path / "palette.png", transparency=transparent_index)
    assert image.mode == "P" and image.info.get("transparency") is not None

    out = _preprocess(image)

    assert np.isfinite(out.pixels).all()
    _, _, p, _ = _reference("tiny-a")
    white = (1.0 - np.asarray(p.image_mean)) / np.asarray(p.image_std)
    np.testing.assert_allclose(out.pixels[0, :, 0, 0], white, atol=1e-5)   # inside the transparent block


def test_an_animated_gif_uses_its_first_frame(tmp_path: Path) -> None:
    frames = [Image.fromarray(_gradient()).quantize(64), Image.new("P", (61, 37), 7)]
    frames[0].save(tmp_path / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    frames[0].save(tmp_path / "first.gif")
    frames[1].save(tmp_path / "second.gif")

    animated = _preprocess(load_image(tmp_path / "animated.gif")).pixels

    assert np.isfinite(animated).all()
    np.testing.assert_array_equal(animated, _preprocess(load_image(tmp_path / "first.gif")).pixels)
    assert not np.array_equal(animated, _preprocess(load_image(tmp_path / "second.gif")).pixels)


def test_paths_bytes_and_pil_images_load_alike() -> None:
    path = IMAGES / "palette_110x27.png"
    from_path = load_image(path)
    assert content_id(load_image(str(path))) == content_id(from_path)
    assert content_id(load_image(path.read_bytes())) == content_id(from_path)
    with Image.open(path) as opened:
        assert content_id(load_image(opened)) == content_id(from_path)


def test_content_id_tells_apart_images_that_differ_only_in_palette() -> None:
    image = load_image(IMAGES / "palette_110x27.png")
    recoloured = image.copy()
    recoloured.putpalette([255 - v for v in image.getpalette()])
    assert recoloured.tobytes() == image.tobytes()
    assert content_id(recoloured) != content_id(image)


def _load_error(source: str | Path | bytes) -> str:
    with pytest.raises(ImageError) as raised:
        load_image(source)
    message = str(raised.value)
    assert "\n" not in message
    return message


def test_a_text_file_is_a_one_line_error(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("not a picture\nat all\n")
    message = _load_error(path)
    assert str(path) in message and "not an image" in message


def test_a_truncated_file_is_a_one_line_error(tmp_path: Path) -> None:
    data = (IMAGES / "rgb_173x97.png").read_bytes()
    path = tmp_path / "cut.png"
    path.write_bytes(data[: len(data) // 2])
    assert str(path) in _load_error(path)


def test_truncated_bytes_are_a_one_line_error_naming_image_data() -> None:
    data = (IMAGES / "rgb_173x97.png").read_bytes()
    assert "image data" in _load_error(data[: len(data) // 2])


def test_a_zero_byte_file_is_a_one_line_error(tmp_path: Path) -> None:
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    message = _load_error(path)
    assert str(path) in message and "empty" in message
    assert "empty" in _load_error(b"")


def test_a_missing_path_is_a_one_line_error(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.png"
    message = _load_error(path)
    assert str(path) in message and "no such file" in message


def test_a_directory_is_a_one_line_error(tmp_path: Path) -> None:
    message = _load_error(tmp_path)
    assert str(tmp_path) in message and "directory" in message


@pytest.mark.parametrize("name", ["rgb_24x50.png",    # 1200 pixels: over the limit, Pillow only warns
                                  "rgb_173x97.png"])  # 16781 pixels: over twice the limit, Pillow raises
def test_a_decompression_bomb_is_a_one_line_error(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    path = IMAGES / name
    message = _load_error(path)
    assert str(path) in message and "too large" in message
    assert "too large" in _load_error(path.read_bytes())
