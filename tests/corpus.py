"""The bad-input corpus, built on the fly (nothing binary in the repo): name -> (bytes, expected status, code)."""

import io
import struct
import zlib

import numpy as np
from PIL import Image

from pipelines.demo import astronaut, grace_hopper  # public-domain portraits shipped in packages


def _png_bomb(side: int = 20_000) -> bytes:
    """A valid greyscale PNG of side x side zero pixels (400 MB decoded at 20000) in a few hundred KB."""
    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    comp = zlib.compressobj(9)
    row = bytes(side + 1)
    body = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def gradient(w=48, h=32, mode="RGB"):
    x = np.linspace(0, 255, w, dtype=np.float64)[None, :].repeat(h, 0)
    y = np.linspace(0, 255, h, dtype=np.float64)[:, None].repeat(w, 1)
    rgb = np.stack([x, y, 255 - x], axis=2).astype(np.uint8)
    return Image.fromarray(rgb).convert(mode)


def bad_input_corpus() -> dict[str, tuple[bytes, str, str]]:
    jpeg = _encode(gradient(), "JPEG", quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW to display
    grey16 = Image.fromarray((np.linspace(0, 65535, 48 * 32).reshape(32, 48)).astype(np.uint16))
    frames = [gradient(), gradient().transpose(Image.FLIP_LEFT_RIGHT)]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:])
    return {
        "ok.jpg": (jpeg, "ok", ""),
        "truncated.jpg": (jpeg[: len(jpeg) // 2], "failed", "decode_error"),
        "empty.jpg": (b"", "failed", "decode_error"),
        "text.jpg": (b"this is not an image\n", "failed", "decode_error"),
        "grey16.png": (_encode(grey16, "PNG"), "ok", ""),
        "cmyk.jpg": (_encode(gradient(mode="CMYK"), "JPEG"), "ok", ""),
        "rgba.png": (_encode(gradient(mode="RGBA"), "PNG"), "ok", ""),
        "palette.png": (_encode(gradient().convert("P"), "PNG"), "ok", ""),
        "exif_rotated.jpg": (_encode(gradient(), "JPEG", exif=exif), "ok", ""),
        "animated.gif": (gif.getvalue(), "ok", ""),
        "bomb.png": (_png_bomb(), "failed", "too_large"),
    }


def two_faces() -> np.ndarray:
    """Both portraits side by side on one canvas: a photo with several faces."""
    a, b = astronaut(), grace_hopper()
    canvas = np.full((max(a.shape[0], b.shape[0]), a.shape[1] + b.shape[1], 3), 200, np.uint8)
    canvas[:a.shape[0], :a.shape[1]] = a
    canvas[:b.shape[0], a.shape[1]:] = b
    return canvas


def face_corpus() -> dict[str, tuple[bytes, str, str]]:
    """The corpus as `--align ffhq` sees it: decodable images without a face fail as no_face; two face photos added
    (one with a single face, one with two: aligned to the best face unless --strict-faces)."""
    corpus = {name: (data, "failed", "no_face") if status == "ok" else (data, status, code)
              for name, (data, status, code) in bad_input_corpus().items()}
    corpus["face.png"] = (_encode(Image.fromarray(astronaut()), "PNG"), "ok", "")
    corpus["two_faces.jpg"] = (_encode(Image.fromarray(two_faces()), "JPEG", quality=92), "ok", "")
    return corpus
