"""Ingest: list inputs, read bytes, decode robustly to RGB8. No Ray.

Decoding never raises for a bad file: `decode_row` returns a row whose `status` is `failed` with an
`error_code` (`read_error`, `decode_error`, `too_large`) and a human `error`. Image size is checked from the
header before any pixel is decoded, so a decompression bomb costs nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import posixpath
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from models.checkpoints import read_bytes
from ops.align import AlignConfig, AlignError, align_image
from ops.images import thumbnail
from ops.redact import redact
from ops.stage import Column, Context, Plan, Stage, image_column, objects

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MASK_SUFFIX = ".mask.png"  # `photo.jpg`'s known-pixel mask is `photo.mask.png` beside it (white = known)


def mask_uri(uri: str) -> str:
    return posixpath.splitext(uri)[0] + MASK_SUFFIX


def is_image(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS) and not path.lower().endswith(MASK_SUFFIX)


@dataclass(frozen=True)
class DecodeConfig:
    max_pixels: int = 64_000_000  # width * height above this is refused as too_large (never decoded)
    max_side: int = 16_384  # an image side above this (px) is refused as too_large


class DecodeError(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def list_inputs(inputs: list[str]) -> list[tuple[str, str]]:
    """(key, uri) for every input image, sorted by key (see `list_input_files`)."""
    return [(key, uri) for key, uri, _ in list_input_files(inputs)]


def list_input_files(inputs: list[str]) -> list[tuple[str, str, dict]]:
    """(key, uri, listing info: size, mtime or ETag) for every input image, sorted by key, from the listing calls
    alone (no extra read per file). A directory gives keys relative to it (recursive, image extensions only),
    prefixed by the directory's own name when several inputs are given; a glob gives the full path/URI of each
    match; a plain file or URI is its own key. Two different files with one key are refused, naming both (never a
    silently dropped input)."""
    import fsspec

    found: dict[str, tuple[str, dict]] = {}

    def add(key: str, uri: str, info: dict) -> None:
        if found.setdefault(key, (uri, info))[0] != uri:
            raise ValueError(f"inputs {found[key][0]} and {uri} would both be stored as key {key!r}; give their "
                             "folders distinct names or pass them as separate runs")

    for spec in inputs:
        fs, root = fsspec.core.url_to_fs(spec)
        prefix = spec.split("://")[0] + "://" if "://" in spec else ""
        if any(ch in spec for ch in "*?["):
            for path, info in sorted(fs.glob(root, detail=True).items()):
                if not path.lower().endswith(MASK_SUFFIX) and info.get("type") != "directory":
                    add(prefix + path, prefix + path, info)
        elif fs.isdir(root):
            name = posixpath.basename(root.rstrip("/"))
            for path, info in sorted(fs.find(root, detail=True).items()):
                if is_image(path):
                    rel = posixpath.relpath(path, root)
                    add(f"{name}/{rel}" if len(inputs) > 1 else rel, prefix + path, info)
        else:
            try:
                info = fs.info(root)
            except FileNotFoundError:  # a missing file is still one row (read_error), never dropped
                info = {"size": -1}
            add(redact(spec), spec, info)  # the key is recorded: never with the URL's credentials
    return sorted((key, uri, info) for key, (uri, info) in found.items())


def _to_rgb8(im: Image.Image) -> np.ndarray:
    """Any Pillow mode -> uint8 [H, W, 3]. 16-bit and float greyscale are rescaled, alpha is composited on white."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        a = np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(a[:, :, None], 3, axis=2)
    if im.mode == "P":
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
    if im.mode in ("RGBA", "LA", "PA"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, rgba)
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def decode_image(data: bytes, config: DecodeConfig = DecodeConfig()) -> tuple[np.ndarray, str]:
    """bytes -> (uint8 [H, W, 3] upright RGB, format). Raises DecodeError."""
    if not data:
        raise DecodeError("decode_error", "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            w, h = im.size
            if w * h > config.max_pixels or max(w, h) > config.max_side:
                raise DecodeError("too_large", f"{w}x{h} image exceeds the limits ({config.max_pixels} pixels, "
                                               f"{config.max_side} px a side); not decoded")
            fmt = im.format or "unknown"
            im.seek(0)  # animated images: the first frame
            im.load()
            im = ImageOps.exif_transpose(im)
            return _to_rgb8(im), fmt
    except DecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DecodeError("too_large", f"refused by the decompression-bomb guard ({exc}); not decoded") from None
    except Exception as exc:  # Pillow raises many kinds for truncated or foreign bytes
        raise DecodeError("decode_error", f"cannot decode image: {type(exc).__name__}: {exc}") from None


def decode_row(key: str, data: bytes | None, config: DecodeConfig = DecodeConfig(), read_error: str | None = None) -> dict:
    """One ingest row: key, sha256, width, height, format, status, error_code, error, image (uint8 HWC or None)."""
    row = {"key": key, "sha256": hashlib.sha256(data).hexdigest() if data is not None else "", "width": 0,
           "height": 0, "format": "", "status": "ok", "error_code": "", "error": "", "image": None}
    if data is None:
        return {**row, "status": "failed", "error_code": "read_error", "error": read_error or "unreadable"}
    try:
        image, fmt = decode_image(data, config)
    except DecodeError as exc:
        return {**row, "status": "failed", "error_code": exc.code, "error": str(exc)}
    return {**row, "width": image.shape[1], "height": image.shape[0], "format": fmt, "image": image}


def align_columns(size: int, aligned=None) -> dict:
    """The alignment columns of one row (NaN / -1 where nothing was aligned or detected)."""
    nan = np.float32("nan")
    row = {"image": np.zeros((size, size, 3), np.uint8), "n_faces": -1, "face_score": nan,
           "landmarks": np.full((68, 2), nan, np.float32), "quad": np.full((4, 2), nan, np.float32),
           "align_transform": np.full((2, 3), nan, np.float32)}
    if aligned is not None:
        row.update(image=aligned.image, n_faces=aligned.n_faces, face_score=np.float32(aligned.face_score),
                   quad=aligned.quad.astype(np.float32), align_transform=aligned.transform.astype(np.float32))
        if aligned.landmarks is not None:
            row["landmarks"] = aligned.landmarks.astype(np.float32)
    return row


def read_row(key: str, uri: str, config: DecodeConfig) -> dict:
    """Read and decode one input; an unreadable file is a `read_error` row (transient: retried by a rerun)."""
    try:
        data, read_error = read_bytes(uri), None
    except Exception as exc:  # missing file, network or permission error: the row records it
        data, read_error = None, f"{type(exc).__name__}: {exc}"
    return decode_row(key, data, config, read_error=read_error)


def aligned_mask(uri: str, photo_shape: tuple, aligned, size: int, align: AlignConfig) -> np.ndarray:
    """The photo's mask file (`<name>.mask.png`, white = known) cut like the photo: uint8 [size, size], 255 known;
    all known when there is no mask file; outside the photo unknown (0)."""
    from ops.align import center_crop_resize, crop_quad

    try:
        data = read_bytes(mask_uri(uri))
    except FileNotFoundError:
        return np.full((size, size), 255, np.uint8)
    mask = np.asarray(Image.open(io.BytesIO(data)).convert("L"))
    if mask.shape != photo_shape[:2]:
        raise DecodeError("decode_error", f"mask {mask_uri(uri)} is {mask.shape[1]}x{mask.shape[0]}, the photo "
                                          f"{photo_shape[1]}x{photo_shape[0]}")
    rgb = np.repeat(mask[..., None], 3, axis=2)
    cut = center_crop_resize(rgb, size).image if align.align == "none" else \
        crop_quad(rgb, aligned.quad, size, align.transform_size, pad=False)
    return np.where(cut[..., 0] >= 128, 255, 0).astype(np.uint8)


def ingest_row(key: str, uri: str, size: int, config: DecodeConfig = DecodeConfig(),
               align: AlignConfig = AlignConfig(), masks: bool = False) -> dict:
    """Read, decode and align one input to uint8 [size, size, 3] plus its alignment columns, a thumbnail of the
    photo (`original`) and, with `masks`, its aligned mask. Never raises: unreadable, undecodable or faceless
    inputs come back with their error."""
    row = read_row(key, uri, config)
    aligned = None
    if row["status"] == "ok":
        try:
            aligned = align_image(row["image"], size, align)
        except AlignError as exc:
            row.update(status="failed", error_code=exc.code, error=str(exc))
        except (RuntimeError, ValueError) as exc:  # a detector choking on one odd photo fails that row only
            row.update(status="failed", error_code="align_error", error=f"{type(exc).__name__}: {exc}")
    thumb = thumbnail(row["image"], size) if row["image"] is not None else np.zeros((size, size, 3), np.uint8)
    out = {**row, **align_columns(size, aligned), "original": thumb}
    if masks:
        out["mask"] = np.zeros((size, size), np.uint8)
        if aligned is not None:
            try:
                out["mask"] = aligned_mask(uri, row["image"].shape, aligned, size, align)
            except DecodeError as exc:
                out.update(status="failed", error_code=exc.code, error=str(exc))
            except Exception as exc:  # an unreadable or undecodable mask fails its photo's row
                out.update(status="failed", error_code="decode_error", error=f"mask: {type(exc).__name__}: {exc}")
    return out


@dataclass(frozen=True)
class IngestConfig:
    size: int | None = None  # crop size in px (None: what the stage after ingest takes; alone: the bundled model's)
    masks: bool = False  # read each photo's known-pixel mask `<name>.mask.png` (white = known) into column `mask`
    alignment: AlignConfig = AlignConfig()
    decode: DecodeConfig = DecodeConfig()


INGEST_COLUMNS = (Column("sha256", "str"), Column("format", "str"), Column("width", "int64"),
                  Column("height", "int64"), Column("n_faces", "int64", fill=-1), Column("face_score", "float32"),
                  Column("landmarks", "float32", (68, 2)), Column("quad", "float32", (4, 2)),
                  Column("align_transform", "float32", (2, 3)))


class IngestStage(Stage):
    """Photos -> decoded, aligned crops (`image`, uint8 [size, size, 3]) with their geometry; `keep_pixels` also
    stores the crops (column `aligned`) when ingest is the stage whose output is kept."""

    name = "ingest"
    Config = IngestConfig
    help = "decode + align photos; crops and geometry to Parquet (invert, translate, ... read it)"
    examples = ("latentray ingest --input photos/ --output out/aligned --size 1024",
                "latentray ingest --input s3://bucket/photos/ --output s3://bucket/aligned --align none")
    photos = "self"
    reads_outputs = False
    describes_input = ("sha256",)  # a photo that fails to decode or align still says which bytes it was

    def __init__(self, config: IngestConfig | None = None, keep_pixels: bool = True):
        super().__init__(config)
        self.keep_pixels = keep_pixels

    @classmethod
    def feeding(cls, image_size: int, config: IngestConfig | None = None) -> "IngestStage":
        """The ingest that turns photos into the input of a stage taking `image_size` crops (or a larger size
        given, which that stage then reduces); pixels passed on, not stored."""
        config = config or IngestConfig()
        size = config.size or image_size
        if size < image_size:
            raise ValueError(f"--size {size} is below the {image_size} px the stage needs")
        return cls(dataclasses.replace(config, size=size), keep_pixels=False)

    def prepare(self, context: Context) -> Plan:
        from models.checkpoints import file_sha256
        from models.default_generator import ARCHITECTURE as BUNDLED
        from ops.align import LANDMARKS_68, check_backend, face_models_dir

        check_backend(self.config.alignment)  # a missing landmark model fails here, not once per image
        size = self.config.size or BUNDLED["size"]
        outputs = [*INGEST_COLUMNS, image_column("image", size, stored=False),
                   image_column("original", size, stored=False)]
        if self.config.masks:
            outputs.append(Column("mask", "uint8", (size, size)))
        if self.keep_pixels:
            outputs.append(image_column("aligned", size))
        checkpoints = {"landmarks": file_sha256(str(face_models_dir() / LANDMARKS_68))} \
            if self.config.alignment.align == "ffhq" else {}
        return Plan(outputs=tuple(outputs), image_size=size, checkpoints=checkpoints,
                    previews=("original", "image") if self.keep_pixels else ())

    def compute(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        size = self.plan.image_size
        rows = [ingest_row(k, u, size, self.config.decode, self.config.alignment, self.config.masks)
                for k, u in zip(batch["key"], batch["uri"])]
        out = {c: objects([r[c] for r in rows]) for c in ("error_code", "error", "sha256", "format")}
        out.update({c.name: np.stack([np.asarray(r[c.name], dtype=c.dtype) for r in rows])
                    for c in INGEST_COLUMNS if c.dtype != "str"})
        out["image"] = np.stack([r["image"] for r in rows])
        out["original"] = np.stack([r["original"] for r in rows])
        if self.config.masks:
            out["mask"] = np.stack([r["mask"] for r in rows])
        if self.keep_pixels:
            out["aligned"] = out["image"]
        return out


@dataclass(frozen=True)
class DecodeOnlyConfig:
    decode: DecodeConfig = DecodeConfig()


class DecodeStage(Stage):
    """Photos -> decoded RGB as lossless PNG bytes (`image`), for stages that take whole photos of any size."""

    name = "decode"
    Config = DecodeOnlyConfig
    describes_input = ("sha256",)

    @classmethod
    def feeding(cls, image_size: int | None, config: DecodeOnlyConfig | None = None) -> "DecodeStage":
        return cls(config)

    def prepare(self, context: Context) -> Plan:
        return Plan(outputs=(Column("sha256", "str"), Column("image", "bytes", stored=False)))

    def compute(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from ops.images import encode_png

        rows = [read_row(k, u, self.config.decode) for k, u in zip(batch["key"], batch["uri"])]
        return {"sha256": objects([r["sha256"] for r in rows]), "error_code": objects([r["error_code"] for r in rows]),
                "error": objects([r["error"] for r in rows]),
                "image": objects([encode_png(r["image"]) if r["image"] is not None else b"" for r in rows])}


PHOTO_READERS = {"ingest": (IngestStage, IngestConfig), "decode": (DecodeStage, DecodeOnlyConfig)}


def photo_reader(kind: str, image_size: int | None, config=None) -> Stage:
    """The CPU stage turning photo files into the rows of a stage whose `photos` is `kind`."""
    return PHOTO_READERS[kind][0].feeding(image_size, config)
