"""Face alignment policies. `none`: BDInvert's out-of-range setting — centre-crop to a square, resize, nothing else.
(The FFHQ landmark alignment is the next piece of the pipeline issue.)"""

from __future__ import annotations

import numpy as np
from PIL import Image


def center_crop_resize(image: np.ndarray, size: int) -> tuple[np.ndarray, list[float]]:
    """uint8 [H, W, 3] -> (uint8 [size, size, 3], crop box [left, top, right, bottom] in source pixels); Lanczos."""
    h, w = image.shape[:2]
    side = min(h, w)
    left, top = (w - side) // 2, (h - side) // 2
    box = [left, top, left + side, top + side]
    out = Image.fromarray(image).crop(tuple(box)).resize((size, size), Image.LANCZOS)
    return np.asarray(out, dtype=np.uint8), [float(v) for v in box]
