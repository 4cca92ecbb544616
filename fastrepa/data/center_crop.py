"""The ADM center crop (guided-diffusion image_datasets.center_crop_arr), as REPA's dataset_tools.py
`--transform=center-crop-dhariwal` applies it: halve with BOX while the short side is at least twice the
target, resize the short side to the target with BICUBIC (sizes rounded), then crop the center square."""
import numpy as np
from PIL import Image


def center_crop_arr(image: Image.Image | np.ndarray, image_size: int) -> np.ndarray:
    """RGB PIL image or uint8 [H, W, 3] array -> uint8 [image_size, image_size, 3]."""
    pil = Image.fromarray(image) if isinstance(image, np.ndarray) else image
    while min(*pil.size) >= 2 * image_size:
        pil = pil.resize(tuple(x // 2 for x in pil.size), resample=Image.Resampling.BOX)
    scale = image_size / min(*pil.size)
    pil = pil.resize(tuple(round(x * scale) for x in pil.size), resample=Image.Resampling.BICUBIC)
    arr = np.array(pil)
    y = (arr.shape[0] - image_size) // 2
    x = (arr.shape[1] - image_size) // 2
    return arr[y:y + image_size, x:x + image_size]
