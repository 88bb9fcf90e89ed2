"""The demo's data: scikit-learn's handwritten digits (shipped inside scikit-learn, nothing is
downloaded) or an image folder with one sub-folder per class, as 1 x 32 x 32 float tensors with a
fixed, seeded, stratified train/test split."""
import os

import numpy as np
import torch
import torch.nn.functional as F

SIZE = 32
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm")


class DataError(ValueError):
    """A --data folder the demo cannot use; the message says which path and why."""


class Dataset:
    """Train and test tensors: x of shape (n, 1, 32, 32) standardized with the train statistics,
    y of class indices (int64); `classes` names each index."""

    def __init__(self, x_train, y_train, x_test, y_test, classes, source):
        mean, std = x_train.mean(), x_train.std().clamp_min(1e-6)
        self.x_train, self.x_test = (x_train - mean) / std, (x_test - mean) / std
        self.y_train, self.y_test = y_train, y_test
        self.classes, self.source = list(classes), source

    def __repr__(self):
        return "%s: %d train / %d test images, %d classes" % (self.source, len(self.y_train), len(self.y_test),
                                                             len(self.classes))


def _split(images, labels, test_fraction, seed):
    """Stratified split with a fixed seed, so every run (and every DDP rank) sees the same one."""
    from sklearn.model_selection import train_test_split
    x_train, x_test, y_train, y_test = train_test_split(images, labels, test_size=test_fraction, random_state=seed,
                                                        stratify=labels)
    return x_train, y_train, x_test, y_test


def _to_32(images):
    """(n, h, w) floats in [0, 1] -> (n, 1, 32, 32) by bilinear resizing (8x8 digits become 32x32)."""
    x = torch.as_tensor(np.asarray(images, dtype=np.float32)).unsqueeze(1)
    if tuple(x.shape[-2:]) != (SIZE, SIZE):
        x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    return x


def load_digits(test_fraction=0.2, seed=0):
    """The 1,797 8x8 digits of scikit-learn (pixel values 0-16), resized to 32x32."""
    from sklearn.datasets import load_digits as sk_load_digits
    digits = sk_load_digits()
    images = digits.images / 16.0
    x_train, y_train, x_test, y_test = _split(images, digits.target, test_fraction, seed)
    return Dataset(_to_32(x_train), torch.as_tensor(y_train, dtype=torch.int64), _to_32(x_test),
                   torch.as_tensor(y_test, dtype=torch.int64), [str(i) for i in range(10)], "sklearn digits")


def _read_image(path):
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as img:
            img = img.convert("L").resize((SIZE, SIZE), Image.BILINEAR)
            return np.asarray(img, dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError("--data: cannot read image %s (%s)" % (path, exc)) from None


def load_folder(path, test_fraction=0.2, seed=0):
    """Images under path/<class>/*.png (any format PIL reads), as grayscale 32x32.

    Raises DataError for a missing path, a file instead of a folder, fewer than two class folders,
    a class folder without images, fewer than two images in a class (the split is stratified) and
    unreadable image files, naming the offending path."""
    if not os.path.exists(path):
        raise DataError("--data: %s does not exist" % path)
    if not os.path.isdir(path):
        raise DataError("--data: %s is not a directory (expected one sub-folder of images per class)" % path)
    classes = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)) and not d.startswith("."))
    if not classes:
        raise DataError("--data: %s has no class sub-folders (expected %s/<class>/<image>.png)" % (path, path))
    if len(classes) < 2:
        raise DataError("--data: %s has one class folder (%s); a classifier needs at least 2" % (path, classes[0]))
    images, labels = [], []
    for index, name in enumerate(classes):
        folder = os.path.join(path, name)
        files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS)
                       and os.path.isfile(os.path.join(folder, f)))
        if not files:
            raise DataError("--data: class folder %s has no image files (%s)" % (folder, ", ".join(IMAGE_EXTENSIONS)))
        if len(files) < 2:
            raise DataError("--data: class folder %s has 1 image; each class needs at least 2 for the "
                            "train/test split" % folder)
        for f in files:
            images.append(_read_image(os.path.join(folder, f)))
            labels.append(index)
    labels = np.asarray(labels)
    n_test = max(len(classes), int(round(test_fraction * len(labels))))
    if len(labels) - n_test < len(classes):
        raise DataError("--data: %d images in %d classes are too few for a train/test split with every class "
                        "in both" % (len(labels), len(classes)))
    x_train, y_train, x_test, y_test = _split(np.stack(images), labels, n_test, seed)
    return Dataset(_to_32(x_train), torch.as_tensor(y_train, dtype=torch.int64), _to_32(x_test),
                   torch.as_tensor(y_test, dtype=torch.int64), classes, "image folder %s" % path)


def load(path=None, seed=0):
    """The digits when path is None, else the image folder at path."""
    return load_digits(seed=seed) if path is None else load_folder(path, seed=seed)
