"""Data: image I/O, normalization, crappify, patches and stitching, datasets, augmentation.

Arrays are channel-last in numpy ((y, x, c) / (z, y, x, c)) and channel-first in torch.
"""
