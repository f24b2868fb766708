"""Image loading and Llama 3.2 Vision preprocessing, equal to HF's MllamaImageProcessor (PIL backend, 5.23).

The model was trained on what HF's processor produces, so every step below mirrors it, including its
quirks: transparency is composited on white, the image is resized as uint8 by Pillow, and the zero padding
happens *before* rescale and normalise (so padding inside real tiles ends up as -mean/std, while whole
padded tiles are exact zeros).
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from models.errors import LvaError
from models.mllama.hparams import ImagePreprocessing, hf_aspect_ratios

ImageSource = str | os.PathLike | bytes | Image.Image


class ImageError(LvaError):
    """A user-supplied image that cannot be used; str() is a one-line message naming the file."""


@dataclass(frozen=True, eq=False)   # eq=False: numpy arrays have no truth value, so no field-wise __eq__
class PreprocessedImage:
    """One image as the vision encoder takes it."""

    pixels: np.ndarray              # float32 [max_num_tiles, 3, tile, tile]; tiles past num_tiles are zeros
    aspect_ratio_id: int            # 1-based index into HF's aspect-ratio list (see `hf_aspect_ratios`)
    num_tiles: int                  # real tiles = rows * cols
    tiles: tuple[int, int]          # (rows, cols)


def load_image(source: ImageSource) -> Image.Image:
    """Open and fully decode an image, upright (EXIF orientation applied), first frame only.

    Decoding everything here means a truncated or hostile file fails now, with a message naming it,
    rather than later inside preprocessing.
    """
    name = _name(source)
    if isinstance(source, bytes) and not source:
        raise ImageError(f"{name}: empty (0 bytes)")
    if not isinstance(source, (bytes, Image.Image)):
        if os.path.isdir(source):
            raise ImageError(f"{name}: is a directory, not an image")
        if os.path.isfile(source) and os.path.getsize(source) == 0:
            raise ImageError(f"{name}: empty file (0 bytes)")
    try:
        if isinstance(source, Image.Image):
            return ImageOps.exif_transpose(source)
        return _open(io.BytesIO(source) if isinstance(source, bytes) else os.fspath(source))
    except FileNotFoundError:
        raise ImageError(f"{name}: no such file") from None
    except PermissionError:
        raise ImageError(f"{name}: permission denied") from None
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image (or a format Pillow cannot read)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"{name}: too large to open safely ({_one_line(e)})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:    # what Pillow raises for corrupt or cut-off data
        raise ImageError(f"{name}: cannot decode image ({_one_line(e)})") from None


def _open(fp: str | io.BytesIO) -> Image.Image:
    # Pillow only warns between MAX_IMAGE_PIXELS and twice that; refuse both, a huge image is never useful here.
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(fp) as image:
            # exif_transpose loads the current frame (frame 0 right after open) and returns a detached copy.
            return ImageOps.exif_transpose(image)


def _name(source: ImageSource) -> str:
    if isinstance(source, bytes):
        return "image data"
    if isinstance(source, Image.Image):
        return getattr(source, "filename", "") or "image"
    return _one_line(os.fspath(source))


def _one_line(error: object) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def content_id(image: Image.Image) -> str:
    """A cache key for a loaded image: sha256 of everything preprocessing reads from it.

    That is mode, size and pixels, plus the palette and the transparency key, since two P images with the
    same indices but different palettes (or a tRNS colour) convert to different RGB.
    """
    h = hashlib.sha256()
    h.update(f"{image.mode}\0{image.size[0]}x{image.size[1]}\0".encode())
    h.update(image.tobytes())
    if image.palette is not None:
        palette = bytes(image.getpalette(image.palette.mode) or [])
        h.update(b"\0palette\0" + image.palette.mode.encode() + b"\0" + palette)
    h.update(f"\0transparency\0{image.info.get('transparency')!r}".encode())
    return h.hexdigest()


def _optimal_grid(height: int, width: int, tile_size: int, ratios: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """HF's `get_optimal_tiled_canvas`, as a (rows, cols) tile grid.

    The scale of a canvas is the one that fits the image inside it. Prefer the least upscaling; if every
    canvas needs downscaling, the least downscaling. Among equal scales the smallest area wins, then the
    first in list order (np.argmin).
    """
    scales = [min(rows * tile_size / height, cols * tile_size / width) for rows, cols in ratios]
    up = [s for s in scales if s >= 1]
    best = min(up) if up else max(scales)
    candidates = [r for r, s in zip(ratios, scales) if s == best]
    return min(candidates, key=lambda r: r[0] * r[1])


def _fit_to_canvas(height: int, width: int, canvas_h: int, canvas_w: int, tile_size: int) -> tuple[int, int]:
    """HF's `get_image_size_fit_to_canvas`: the resized (height, width), aspect kept, at least one tile wide
    or tall, never past the canvas."""
    target_w = min(max(width, tile_size), canvas_w)
    target_h = min(max(height, tile_size), canvas_h)
    scale_h, scale_w = target_h / height, target_w / width
    if scale_w < scale_h:
        return min(int(height * scale_w) or 1, target_h), target_w
    return target_h, min(int(width * scale_h) or 1, target_w)


def _to_rgb(image: Image.Image) -> Image.Image:
    """HF's `convert_to_rgb`: anything with an alpha band or a transparency key is composited on white.

    Like HF, an "A" band counts as alpha whatever the mode (so LAB, whose bands are L, A, B, goes that way too).
    """
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def preprocess(image: Image.Image, p: ImagePreprocessing, tile_size: int, max_num_tiles: int,
               supported_aspect_ratios: Sequence[tuple[int, int]]) -> PreprocessedImage:
    """Tile one loaded image exactly as MllamaImageProcessorPil does for a single image."""
    ratios = hf_aspect_ratios(max_num_tiles)
    if [tuple(r) for r in supported_aspect_ratios] != ratios:
        # HF would still number the grids from its own list, so the ids would not mean what the checkpoint says.
        raise ValueError(f"supported_aspect_ratios {list(supported_aspect_ratios)} differ from the ones HF's "
                         f"processor uses for {max_num_tiles} tiles: {ratios}")
    if not p.do_pad:
        raise ValueError("Llama 3.2 Vision preprocessing needs do_pad (HF refuses do_pad=False too)")
    if p.do_convert_rgb:
        image = _to_rgb(image)
    elif image.mode != "RGB":
        raise ValueError(f"a {image.mode} image needs do_convert_rgb, which this checkpoint turns off")

    rows, cols = _optimal_grid(image.height, image.width, tile_size, ratios)
    new_h, new_w = _fit_to_canvas(image.height, image.width, rows * tile_size, cols * tile_size, tile_size)
    resized = np.asarray(image.resize((new_w, new_h), resample=Image.Resampling(p.resample)))

    canvas = np.zeros((rows * tile_size, cols * tile_size, 3), dtype=np.uint8)
    canvas[:new_h, :new_w] = resized
    # HF rescales in float64 and rounds to float32; normalising is then float32.
    x: np.ndarray = ((canvas.astype(np.float64) * p.rescale_factor).astype(np.float32) if p.do_rescale
                     else canvas.astype(np.float32))
    if p.do_normalize:
        x = (x - np.asarray(p.image_mean, np.float32)) / np.asarray(p.image_std, np.float32)

    # [rows*T, cols*T, 3] -> [rows*cols, 3, T, T], tiles in row-major order.
    tiles = x.reshape(rows, tile_size, cols, tile_size, 3).transpose(0, 2, 4, 1, 3)
    pixels = np.zeros((max_num_tiles, 3, tile_size, tile_size), dtype=np.float32)
    pixels[: rows * cols] = tiles.reshape(rows * cols, 3, tile_size, tile_size)
    return PreprocessedImage(pixels=pixels, aspect_ratio_id=ratios.index((rows, cols)) + 1,
                             num_tiles=rows * cols, tiles=(rows, cols))
