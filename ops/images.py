"""Image array helpers shared by stages: tensor <-> uint8 and preview grids. No Ray, no models; torch is imported
only where a tensor is converted, so the CPU tasks (decode, align, write) never pay for importing it."""

from __future__ import annotations

import numpy as np


def to_uint8(images) -> np.ndarray:
    """[B, 3, H, W] tensor in [-1, 1] -> uint8 [B, H, W, 3] (values outside the range are clipped)."""
    import torch

    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round()
    return x.to(torch.uint8).permute(0, 2, 3, 1).numpy()


def to_tensor(images: np.ndarray, device=None):
    """uint8 [B, H, W, 3] -> float32 [B, 3, H, W] tensor in [-1, 1] (the inverse of `to_uint8`)."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(images).astype(np.float32)).permute(0, 3, 1, 2) / 127.5 - 1
    return x.to(device) if device is not None else x


def make_grid(images: np.ndarray, ncols: int, pad: int = 2) -> np.ndarray:
    """uint8 [N, H, W, 3] -> one uint8 [rows*(H+pad)+pad, cols*(W+pad)+pad, 3] image, row-major, white padding."""
    n, h, w, c = images.shape
    nrows = -(-n // ncols)
    grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, ncols)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + col * (w + pad):pad + col * (w + pad) + w] = img
    return grid


def thumbnail(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W, 3] -> the whole photo fitted into uint8 [size, size, 3] on grey (previews show the original)."""
    from PIL import Image

    im = Image.fromarray(image)
    im.thumbnail((size, size), Image.LANCZOS)
    canvas = Image.new("RGB", (size, size), (128, 128, 128))
    canvas.paste(im, ((size - im.width) // 2, (size - im.height) // 2))
    return np.asarray(canvas, dtype=np.uint8)


def resize_square(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 [N, R, R, 3] -> [N, size, size, 3]: unchanged at R == size, Lanczos-reduced above (FFHQ's 1024 crops
    for a smaller model); smaller inputs are refused (upsampling would invent detail)."""
    from PIL import Image

    if images.shape[1:3] == (size, size):
        return images
    if images.shape[1] != images.shape[2] or images.shape[1] < size:
        raise ValueError(f"images of {images.shape[2]}x{images.shape[1]} px cannot feed a {size} px model")
    return np.stack([np.asarray(Image.fromarray(a).resize((size, size), Image.LANCZOS)) for a in images])


def preview_grid(columns: list[np.ndarray], rows: np.ndarray) -> np.ndarray:
    """Side-by-side preview: one grid row per selected row, one grid column per uint8 [N, H, W, 3] column
    (e.g. original | aligned | reconstruction per space); tiles are fitted to the smallest column's size."""
    size = min(c.shape[1] for c in columns)
    tiles = np.stack([[c[r] if c.shape[1:3] == (size, size) else thumbnail(c[r], size) for c in columns]
                      for r in rows])
    return make_grid(tiles.reshape(-1, *tiles.shape[2:]), ncols=len(columns))


def decode_png(data: bytes) -> np.ndarray:
    import io

    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def decode_cell(value) -> np.ndarray:
    """An image cell of a stage output: PNG/JPEG bytes or a uint8 [H, W, 3] array."""
    if isinstance(value, (bytes, bytearray)):
        return decode_png(value)
    return np.asarray(value, dtype=np.uint8)


def png_grid(cells: dict, rows: list, cols: list) -> np.ndarray | None:
    """PNG bytes keyed by (row, col) -> one grid image in that order; missing cells white; None if all missing."""
    present = [cells[k] for k in cells if k[0] in rows and k[1] in cols]
    if not present:
        return None
    shape = decode_png(present[0]).shape
    tiles = np.stack([decode_png(cells[(r, c)]) if (r, c) in cells else np.full(shape, 255, np.uint8)
                      for r in rows for c in cols])
    return make_grid(tiles, ncols=len(cols))


def encode_png(image: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def bar_chart(labels: list[str], values: np.ndarray, width: int = 640, bar: int = 18) -> np.ndarray:
    """Horizontal bars (largest first as given), label and value on each; uint8 [H, width, 3]."""
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (width, bar * len(labels) + 8), "white")
    draw = ImageDraw.Draw(im)
    top = float(np.max(values)) if len(values) and np.isfinite(np.max(values)) and np.max(values) > 0 else 1.0
    for i, (label, v) in enumerate(zip(labels, values)):
        y = 4 + i * bar
        length = int((width - 260) * min(float(v) / top, 1.0)) if np.isfinite(v) else width - 260
        draw.rectangle([200, y + 2, 200 + length, y + bar - 3], fill=(70, 110, 180))
        draw.text((4, y + 3), label[:30], fill="black")
        draw.text((206 + length, y + 3), f"{v:.2f}", fill="black")
    return np.asarray(im)


def heat_map(matrix: np.ndarray, row_labels: list[str], col_labels: list[str], cell: int = 14,
             col_width: int = 64) -> np.ndarray:
    """A [R, C] matrix in [0, 1] as grey-to-red cells with row and column labels; uint8 image."""
    from PIL import Image, ImageDraw

    left, top = 150, 24
    im = Image.new("RGB", (left + col_width * len(col_labels) + 4, top + cell * len(row_labels) + 4), "white")
    draw = ImageDraw.Draw(im)
    for j, label in enumerate(col_labels):
        draw.text((left + j * col_width + 2, 6), label[:10], fill="black")
    for i, label in enumerate(row_labels):
        draw.text((4, top + i * cell), label[:24], fill="black")
        for j in range(len(col_labels)):
            v = float(np.clip(matrix[i, j], 0, 1))
            colour = (int(235 - 35 * v), int(235 - 200 * v), int(235 - 200 * v))
            draw.rectangle([left + j * col_width, top + i * cell, left + (j + 1) * col_width - 2,
                            top + (i + 1) * cell - 1], fill=colour)
    return np.asarray(im)


def encode_jpeg(image: np.ndarray, quality: int = 85) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def row_strips(columns: list[np.ndarray], ok: np.ndarray, tile: int = 96) -> list[bytes]:
    """Per row, its preview columns side by side (e.g. original | aligned | reconstruction per space), each fitted
    into `tile` pixels, as JPEG bytes; b"" for rows not `ok` (their pixels are blanks)."""
    size = min(tile, *(c.shape[1] for c in columns))
    out = []
    for r in range(len(ok)):
        if not ok[r]:
            out.append(b"")
            continue
        tiles = [c[r] if c.shape[1:3] == (size, size) else thumbnail(c[r], size) for c in columns]
        out.append(encode_jpeg(make_grid(np.stack(tiles), ncols=len(tiles), pad=1)))
    return out
