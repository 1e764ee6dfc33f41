"""Datasets: the embedded digits, 2-D toys drawn on the fly, user images (folders and zips, read
lazily), arrays, IDX files and CIFAR-10; and a resumable epoch loader over any of them.

    ds = load_dataset("digits")                       # 1,797 images (1, 8, 8), labels 0..9
    ds = load_dataset("8gaussians")                   # 2-D toy, drawn on the fly
    ds = load_dataset("~/faces", resolution=32)       # folder of images, centre-cropped and resized
    ds = load_dataset("ffhq-64x64.zip")               # EDM dataset_tool archive, dataset.json labels
    ds = load_dataset("mnist/", split="test")         # MNIST-format IDX files (t10k-*)
    ds = load_dataset("cifar-10-python.tar.gz")       # CIFAR-10 train, 50,000 images (3, 32, 32)
    ds = load_dataset("fashion-mnist", split="test")  # 10,000 images (1, 28, 28); see load_fashion_mnist
    x, labels = ds.sample(64, device="cuda")          # random batch from the global RNG; labels None if unlabeled
    loader = make_loader(ds, 64, seed=0, workers=4)   # epochs of batches, resumable: see loader.py
    for x, labels in ds.batches(1024): ...            # every example in order, read lazily (evaluation)

Values: images come out as float32 in [-1, 1] shaped (B, C, H, W); vectors as float32 (B, D) with
per-dimension std about 0.5, the `sigma_d` that TrigFlow assumes (docs/math.md#consistency-function). Every dataset is a
map-style torch Dataset whose `__getitems__(indices)` returns `(x,)` or `(x, labels)` (base.py).

Modules: base (the contract, in-memory storage, pixel helpers), toys, digits, arrays (.npy/.npz and
array conventions), idx (MNIST-format files, Fashion-MNIST, MNIST), folders and zipdata (lazy image
files), cifar, loader (sampler, DataLoader, x-flip), registry (`load_dataset`, `register_dataset`).
"""

from fewstep.data.base import SIGMA_D, DataError, Dataset, TensorDataset, unpack_batch
from fewstep.data.cifar import load_cifar10
from fewstep.data.digits import load_digits_dataset
from fewstep.data.folders import IMAGE_EXTENSIONS, ImageFolderDataset
from fewstep.data.idx import _FASHION_MNIST, _MNIST, DATA_SEARCH_DIR, load_fashion_mnist, load_mnist, read_idx
from fewstep.data.loader import EpochBatchSampler, XFlip, loader_position, make_loader
from fewstep.data.registry import DATASETS, load_dataset, register_dataset
from fewstep.data.toys import (TOY_SIZE, Checkerboard, EightGaussians, GaussianDataset, Moons, SwissRoll,
                               ToyDataset)
from fewstep.data.zipdata import ZipImageDataset

__all__ = ["DATASETS", "DataError", "Dataset", "TensorDataset", "ToyDataset", "EightGaussians",
           "Checkerboard", "Moons", "SwissRoll", "GaussianDataset", "ImageFolderDataset", "ZipImageDataset",
           "load_dataset", "register_dataset", "load_digits_dataset", "read_idx", "load_fashion_mnist",
           "load_mnist", "load_cifar10", "EpochBatchSampler", "make_loader", "loader_position", "XFlip",
           "unpack_batch", "IMAGE_EXTENSIONS", "SIGMA_D", "TOY_SIZE", "DATA_SEARCH_DIR"]

# _MNIST / _FASHION_MNIST stay reachable here for tests that swap in fake checksums
