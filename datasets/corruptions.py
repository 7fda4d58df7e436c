"""The 15 CIFAR-10-C corruptions (Hendrycks & Dietterich, ICLR 2019) at 32 px, for the field's users.

Parameters: CIFAR-10-C's own, per severity (read from hendrycks/robustness `make_cifar_c.py`), not
ImageNet-C's: those were set for 224-px photos, and at 32 px their blurs alone (a defocus disk of
radius 3 to 10 pixels) wipe the photo out, where CIFAR-10-C's radius is 0.3 to 1.5. Implementation:
the primitives come from the maintained ImageNet-C code, `imagecorruptions-imaug` (disk kernel,
plasma fractal, clipped zoom, the motion-blur kernel that stands in for ImageMagick's, glass blur's
pixel shuffle, the frost photos), and scikit-image, OpenCV, SciPy and Pillow; each corruption below
composes them as CIFAR-10-C does, written here. Randomness comes from one numpy generator per call,
so a user is the same photos for a given seed.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

CORRUPTIONS = (
    "gaussian_noise", "shot_noise", "impulse_noise",  # noise
    "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",  # blur
    "snow", "frost", "fog", "brightness",  # weather
    "contrast", "elastic_transform", "pixelate", "jpeg_compression",  # digital
)
SIZE = 32
# Per corruption, its parameters at severities 1..5 (CIFAR-10-C's values).
PARAMETERS: dict[str, list] = {
    "gaussian_noise": [0.04, 0.06, 0.08, 0.09, 0.10],  # noise standard deviation, pixels in [0, 1]
    "shot_noise": [500, 250, 100, 75, 50],  # photons per unit intensity
    "impulse_noise": [0.01, 0.02, 0.03, 0.05, 0.07],  # share of salt-and-pepper pixels
    "defocus_blur": [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)],  # disk radius, anti-alias sigma
    "glass_blur": [(0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)],  # sigma, max shift, rounds
    "motion_blur": [(6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)],  # radius, sigma
    "zoom_blur": [1.06, 1.11, 1.16, 1.21, 1.26],  # largest zoom (steps of 0.01 from 1)
    "snow": [(0.1, 0.2, 1, 0.6, 8, 3, 0.95), (0.1, 0.2, 1, 0.5, 10, 4, 0.9), (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
             (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85), (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8)],  # mean, std, zoom, cut, blur radius, sigma, photo share
    "frost": [(1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)],  # photo share, frost share
    "fog": [(0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)],  # fog strength, fractal decay
    "brightness": [0.05, 0.1, 0.15, 0.2, 0.3],  # added to HSV value
    "contrast": [0.75, 0.5, 0.4, 0.3, 0.15],  # contrast kept
    "elastic_transform": [(0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05), (0.1, 0.03, 0.03)],  # x image size: alpha, sigma, affine shift
    "pixelate": [0.95, 0.9, 0.85, 0.75, 0.65],  # size kept before upsampling back
    "jpeg_compression": [80, 65, 58, 50, 40],  # JPEG quality
}


def corrupt(images: np.ndarray, name: str, severity: int, seed: int) -> np.ndarray:
    """`images` (N, 32, 32, 3) uint8 with corruption `name` at `severity` (1..5), reproducibly."""
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}: one of {', '.join(CORRUPTIONS)}")
    if not 1 <= severity <= 5:
        raise ValueError("severity is 1..5")
    if images.shape[1:] != (SIZE, SIZE, 3):
        raise ValueError(f"CIFAR-10-C's parameters are for {SIZE}x{SIZE} RGB photos, not {images.shape[1:]}")
    rng = np.random.default_rng([seed, CORRUPTIONS.index(name), severity])
    function, parameter = globals()[f"_{name}"], PARAMETERS[name][severity - 1]
    return np.stack([np.uint8(np.clip(np.round(function(image / 255.0, parameter, rng) * 255), 0, 255)) for image in images])


def _gaussian_noise(x, sigma, rng):
    return x + rng.normal(scale=sigma, size=x.shape)


def _shot_noise(x, photons, rng):
    return rng.poisson(x * photons) / photons


def _impulse_noise(x, amount, rng):
    from skimage.util import random_noise

    return random_noise(x, mode="s&p", amount=amount, rng=int(rng.integers(2**31)))


def _defocus_blur(x, parameter, rng):
    import cv2
    from imagecorruptions.corruptions import disk

    kernel = disk(radius=parameter[0], alias_blur=parameter[1])
    return np.stack([cv2.filter2D(x[..., channel].astype(np.float32), -1, kernel) for channel in range(3)], axis=-1)


def _glass_blur(x, parameter, rng):
    from imagecorruptions.corruptions import _shuffle_pixels_njit_glass_blur
    from skimage.filters import gaussian

    sigma, shift, rounds = parameter
    blurred = np.uint8(np.clip(gaussian(x, sigma=sigma, channel_axis=-1), 0, 1) * 255)
    shuffled = _shuffle_pixels_njit_glass_blur(SIZE, SIZE, blurred, (sigma, shift, rounds), int(rng.integers(2**31)))
    return gaussian(shuffled / 255.0, sigma=sigma, channel_axis=-1)


def _motion_blur(x, parameter, rng):
    from imagecorruptions.corruptions import _motion_blur as blur

    radius, sigma = parameter
    return blur(x, radius=radius, sigma=sigma, angle=rng.uniform(-45, 45))


def _zoom_blur(x, largest, rng):
    from imagecorruptions.corruptions import clipped_zoom

    factors = np.arange(1, largest, 0.01)
    zoomed = [_centre(clipped_zoom(x.astype(np.float32), factor)) for factor in factors]
    return (x + np.sum(zoomed, axis=0)) / (len(factors) + 1)


def _snow(x, parameter, rng):
    import cv2
    from imagecorruptions.corruptions import _motion_blur as blur, clipped_zoom

    mean, std, zoom, cut, radius, sigma, keep = parameter
    layer = rng.normal(loc=mean, scale=std, size=(SIZE, SIZE, 1))
    layer = _centre(clipped_zoom(layer, zoom))
    layer[layer < cut] = 0
    layer = np.clip(blur(np.clip(layer, 0, 1), radius=radius, sigma=sigma, angle=rng.uniform(-135, -45)), 0, 1)
    grey = cv2.cvtColor(x.astype(np.float32), cv2.COLOR_RGB2GRAY)[..., None]
    x = keep * x + (1 - keep) * np.maximum(x, grey * 1.5 + 0.5)
    return x + layer + np.rot90(layer, k=2)


def _frost(x, parameter, rng):
    import cv2
    import imagecorruptions

    photo_share, frost_share = parameter
    files = sorted((Path(imagecorruptions.__file__).parent / "frost").iterdir())
    frost = cv2.imread(str(files[int(rng.integers(len(files)))]))
    frost = cv2.resize(frost, (0, 0), fx=0.2, fy=0.2)  # CIFAR-10-C's scale of the frost photos
    top, left = int(rng.integers(frost.shape[0] - SIZE)), int(rng.integers(frost.shape[1] - SIZE))
    frost = frost[top : top + SIZE, left : left + SIZE][..., ::-1] / 255.0  # BGR -> RGB
    return photo_share * x + frost_share * frost


def _fog(x, parameter, rng):
    from imagecorruptions.corruptions import plasma_fractal

    strength, decay = parameter
    np.random.seed(int(rng.integers(2**31)))  # the fractal draws from numpy's global generator
    top = x.max()
    fogged = x + strength * plasma_fractal(mapsize=SIZE, wibbledecay=decay)[..., None]
    return fogged * top / (top + strength)


def _brightness(x, added, rng):
    from skimage.color import hsv2rgb, rgb2hsv

    hsv = rgb2hsv(x)
    hsv[..., 2] = np.clip(hsv[..., 2] + added, 0, 1)
    return hsv2rgb(hsv)


def _contrast(x, kept, rng):
    means = x.mean(axis=(0, 1), keepdims=True)
    return (x - means) * kept + means


def _elastic_transform(x, parameter, rng):
    import cv2
    from scipy.ndimage import map_coordinates
    from skimage.filters import gaussian

    alpha, sigma, shift = (SIZE * p for p in parameter)
    centre, square = np.float32([SIZE // 2, SIZE // 2]), SIZE // 3
    corners = np.float32([centre + square, [centre[0] + square, centre[1] - square], centre - square])
    moved = corners + rng.uniform(-shift, shift, size=corners.shape).astype(np.float32)
    x = cv2.warpAffine(x.astype(np.float32), cv2.getAffineTransform(corners, moved), (SIZE, SIZE), borderMode=cv2.BORDER_REFLECT_101)
    dx, dy = (gaussian(rng.uniform(-1, 1, size=(SIZE, SIZE)), sigma, mode="reflect", truncate=3) * alpha for _ in range(2))
    rows, columns, channels = np.meshgrid(np.arange(SIZE), np.arange(SIZE), np.arange(3), indexing="ij")
    where = (rows + dy[..., None]).ravel(), (columns + dx[..., None]).ravel(), channels.ravel()
    return map_coordinates(x, where, order=1, mode="reflect").reshape(x.shape)


def _pixelate(x, kept, rng):
    from PIL import Image

    photo = Image.fromarray(np.uint8(np.round(x * 255)))
    small = photo.resize((int(SIZE * kept), int(SIZE * kept)), Image.BOX)
    return np.asarray(small.resize((SIZE, SIZE), Image.BOX)) / 255.0


def _jpeg_compression(x, quality, rng):
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.uint8(np.round(x * 255))).save(buffer, "JPEG", quality=quality)
    return np.asarray(Image.open(buffer).convert("RGB")) / 255.0


def _centre(image: np.ndarray) -> np.ndarray:
    """The central SIZE x SIZE crop of a zoomed image."""
    top, left = (image.shape[0] - SIZE) // 2, (image.shape[1] - SIZE) // 2
    return image[top : top + SIZE, left : left + SIZE]
