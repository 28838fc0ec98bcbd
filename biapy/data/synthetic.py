"""Synthetic fluorescence-like images with nuclei labels, made offline and deterministically.

Used for the example data shipped with the templates, for tests, and for the fine-tuning
benchmark (where labels must exist). Nuclei are smooth ellipsoids of varied brightness on a
dim, slowly varying background, blurred by a point-spread function, with shot and read noise.
"""
import numpy as np
from scipy import ndimage


def nuclei_image(shape, n_nuclei, radius=(4, 9), channels=1, seed=0, photons=60.0):
    """(image uint8 (*shape, channels), labels uint8 (*shape)) with 0 = background, 1 = nucleus.

    `photons`: expected photon count at full brightness (Poisson noise); lower is noisier."""
    rng = np.random.default_rng(seed)
    ndim = len(shape)
    grids = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij")
    signal = np.zeros(shape, np.float32)
    labels = np.zeros(shape, np.uint8)
    for _ in range(n_nuclei):
        centre = [rng.uniform(0, s) for s in shape]
        radii = [rng.uniform(*radius) for _ in range(ndim)]
        if ndim == 3:
            radii[0] *= 0.6  # thinner in z, as in most stacks
        dist = sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radii))
        inside = dist <= 1.0
        labels[inside] = 1
        texture = 0.75 + 0.25 * np.cos(dist * rng.uniform(3, 8))
        signal = np.maximum(signal, np.where(inside, rng.uniform(0.4, 1.0) * texture, 0))
    background = ndimage.gaussian_filter(rng.random(shape).astype(np.float32), sigma=max(shape) / 8)
    clean = ndimage.gaussian_filter(signal, sigma=1.0) + 0.08 * background / max(background.max(), 1e-6)
    stack = []
    for c in range(channels):
        gain = 1.0 if c == 0 else rng.uniform(0.5, 0.9)
        counts = rng.poisson(clean * gain * photons).astype(np.float32) / photons
        noisy = counts + rng.normal(0, 0.02, shape).astype(np.float32)
        stack.append(np.clip(noisy * 200.0, 0, 255).astype(np.uint8))
    return np.stack(stack, axis=-1), labels


def make_example_data(root, seed=0):
    """Write the example data the templates use under `root` (2D and 3D, train/test, images and labels)."""
    from biapy.data.image_writing import write_image
    from pathlib import Path

    root = Path(root)
    plans = {
        "2d": dict(ndim=2, train=(8, (160, 160), 30), test=(2, (181, 203), 40)),
        "3d": dict(ndim=3, train=(4, (24, 96, 96), 25), test=(1, (27, 101, 93), 30)),
    }
    k = seed
    for name, plan in plans.items():
        for split in ("train", "test"):
            count, shape, nuclei = plan[split]
            for i in range(count):
                k += 1
                image, labels = nuclei_image(shape, nuclei, seed=k)
                write_image(root / name / split / "x" / f"{split}_{i:03d}.tif", image, plan["ndim"])
                write_image(root / name / split / "y" / f"{split}_{i:03d}.tif", labels[..., None], plan["ndim"])
    return root
