"""Datasets on offline data: digits, the Debian Fashion-MNIST files, and files written here
in the official formats (IDX, CIFAR python pickles)."""
import gzip
import os
import pickle
import shutil
import socket
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from mtt.data import SPECS, ZCA, DatasetNotFoundError, _read_tiny_imagenet, dataset_key, load_dataset, read_idx

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


def write_idx(path: Path, array: np.ndarray, gz: bool) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        raw = gzip.compress(raw)
    path.write_bytes(raw)


def write_mnist(folder: Path, n_train=50, n_test=20, gz=True) -> tuple[np.ndarray, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    train_x = rng.integers(0, 256, (n_train, 28, 28))
    train_y = np.arange(n_train) % 10
    write_idx(folder / "train-images-idx3-ubyte", train_x, gz)
    write_idx(folder / "train-labels-idx1-ubyte", train_y, gz)
    write_idx(folder / "t10k-images-idx3-ubyte", rng.integers(0, 256, (n_test, 28, 28)), gz)
    write_idx(folder / "t10k-labels-idx1-ubyte", np.arange(n_test) % 10, gz)
    return train_x, train_y


def write_cifar_batch(path: Path, n: int, num_classes: int, label_key: bytes, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (n, 3072)).astype(np.uint8)
    with open(path, "wb") as f:  # the official files are protocol-2 dicts with bytes keys
        pickle.dump({b"data": data, label_key: [i % num_classes for i in range(n)]}, f, protocol=2)
    return data


def check_split(images, labels, spec):
    assert images.dtype == torch.float32 and labels.dtype == torch.int64
    assert images.shape[1:] == (spec.channels, *spec.im_size)
    assert len(images) == len(labels)
    assert labels.min() >= 0 and labels.max() < spec.num_classes


# ----------------------------------------------------------------------------- loaders

def test_digits():
    ds = load_dataset("digits")
    assert (len(ds.train_images), len(ds.test_images)) == (1347, 450)
    check_split(ds.train_images, ds.train_labels, ds.spec)
    check_split(ds.test_images, ds.test_labels, ds.spec)
    # normalised with the training split's statistics
    assert abs(ds.train_images.mean().item()) < 1e-3 and abs(ds.train_images.std().item() - 1) < 1e-3
    assert ds.class_names == [str(i) for i in range(10)]
    assert torch.bincount(ds.test_labels).min() >= 43  # stratified: a quarter of ~175 per class


def test_fashion_mnist_from_debian_files():
    if not FASHION_DIR.exists():
        if os.environ.get("CI"):
            pytest.fail("CI must install the Debian package dataset-fashion-mnist")
        pytest.skip("apt-get install dataset-fashion-mnist to run this test")
    ds = load_dataset("fashion-mnist")
    assert ds.train_images.shape == (60000, 1, 28, 28) and ds.test_images.shape == (10000, 1, 28, 28)
    check_split(ds.train_images, ds.train_labels, ds.spec)
    assert torch.bincount(ds.train_labels).tolist() == [6000] * 10
    # DESIGN.md's mean/std are those of the training set: normalised data is ~N(0, 1)
    assert abs(ds.train_images.mean().item()) < 1e-3 and abs(ds.train_images.std().item() - 1) < 1e-3
    assert ds.class_names[9] == "Ankle boot"


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_idx_files_from_root(tmp_path, gz):
    train_x, train_y = write_mnist(tmp_path / "mnist", gz=gz)
    ds = load_dataset("mnist", root=tmp_path)
    check_split(ds.train_images, ds.train_labels, ds.spec)
    assert ds.test_images.shape == (20, 1, 28, 28)
    assert ds.train_labels.tolist() == train_y.tolist()
    pixels = ds.train_images * 0.3081 + 0.1307
    assert torch.allclose(pixels[:, 0] * 255, torch.from_numpy(train_x).float(), atol=1e-3)


def test_mtt_data_env_var(tmp_path, monkeypatch):
    write_mnist(tmp_path, n_train=30)
    monkeypatch.setenv("MTT_DATA", str(tmp_path))
    assert len(load_dataset("mnist").train_images) == 30


def test_truncated_idx_file_is_reported(tmp_path):
    write_mnist(tmp_path, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(path)


def test_cifar10_pickles(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    first = write_cifar_batch(folder / "data_batch_1", 20, 10, b"labels", seed=1)
    for i in range(2, 6):
        write_cifar_batch(folder / f"data_batch_{i}", 20, 10, b"labels", seed=i)
    write_cifar_batch(folder / "test_batch", 10, 10, b"labels", seed=9)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": names}, f, protocol=2)

    ds = load_dataset("cifar10", root=tmp_path)
    assert ds.train_images.shape == (100, 3, 32, 32) and ds.test_images.shape == (10, 3, 32, 32)
    check_split(ds.train_images, ds.train_labels, ds.spec)
    assert ds.class_names[3] == "cat"
    # channel-major layout: the first 1024 bytes of a row are the red plane
    red = ds.train_images[0, 0] * 0.2023 + 0.4914
    assert torch.allclose(red.flatten() * 255, torch.from_numpy(first[0, :1024]).float(), atol=1e-3)


def test_cifar100_pickles(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    write_cifar_batch(folder / "train", 200, 100, b"fine_labels", seed=0)
    write_cifar_batch(folder / "test", 100, 100, b"fine_labels", seed=1)
    ds = load_dataset("cifar100", root=tmp_path)
    check_split(ds.train_images, ds.train_labels, ds.spec)
    assert ds.num_classes == 100 and ds.train_labels.max() == 99


class _Exploit:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_malicious_cifar_pickle_is_refused_and_never_runs(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    marker = tmp_path / "pwned"
    with open(folder / "data_batch_1", "wb") as f:
        pickle.dump({b"data": _Exploit(marker), b"labels": [0]}, f, protocol=2)
    with pytest.raises(ValueError, match="refusing to load"):
        load_dataset("cifar10", root=tmp_path)
    assert not marker.exists()


# ----------------------------------------------------------------------------- errors

def test_unknown_dataset_lists_the_names():
    with pytest.raises(ValueError, match="unknown dataset 'imagenet-1k'.*cifar10"):
        load_dataset("imagenet-1k")


def _offline(*args, **kwargs):
    raise OSError("network is unreachable (test)")


@pytest.mark.parametrize("name", ["cifar10", "mnist", "tiny-imagenet"])
def test_missing_dataset_fails_fast_with_where_it_looked(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)  # so ./data is empty
    monkeypatch.delenv("MTT_DATA", raising=False)
    monkeypatch.setattr(socket, "create_connection", _offline)
    start = time.monotonic()
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset(name, root=tmp_path / "nowhere")
    assert time.monotonic() - start < 30
    message = str(err.value)
    assert str(tmp_path / "nowhere") in message and f"/usr/share/datasets/{name}" in message
    assert "Provide the files" in message


def test_missing_dataset_without_download(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DatasetNotFoundError, match="downloading is off"):
        load_dataset("svhn", root=tmp_path, download=False)


# ----------------------------------------------------------------------------- sampling

def test_sample_real_is_seeded_and_from_the_class():
    ds = load_dataset("digits")
    a = ds.sample_real(3, 5, generator=7)
    b = ds.sample_real(3, 5, generator=7)
    assert torch.equal(a, b) and a.shape == (5, 1, 8, 8)
    assert not torch.equal(a, ds.sample_real(3, 5, generator=8))
    class3 = ds.train_images[ds.train_labels == 3]
    for image in a:  # each sample is a real training image of class 3
        assert (class3 == image).flatten(1).all(1).any()
    assert len({tuple(x.flatten().tolist()) for x in a}) == 5  # distinct
    assert (ds.train_labels[ds.class_indices(3)] == 3).all()
    with pytest.raises(ValueError, match="only"):
        ds.sample_real(3, 10_000)


def test_take_per_class():
    small = load_dataset("digits").take_per_class(7, seed=1)
    assert torch.bincount(small.train_labels).tolist() == [7] * 10
    assert len(small.test_images) == 450


def test_resized_dataset_keeps_labels_and_content():
    ds = load_dataset("digits")
    big = ds.resized(32)
    assert big.im_size == (32, 32) and big.train_images.shape == (len(ds.train_images), 1, 32, 32)
    assert big.test_images.shape[-2:] == (32, 32) and torch.equal(big.train_labels, ds.train_labels)
    assert ds.im_size == (8, 8)  # the original is untouched
    # The same picture, 4x larger: 4x4 block means of the upsampled images track the originals.
    back = torch.nn.functional.avg_pool2d(big.train_images[:50], 4)
    assert torch.corrcoef(torch.stack([back.flatten(), ds.train_images[:50].flatten()]))[0, 1] > 0.95
    assert ds.resized(8).train_images is ds.train_images
    with pytest.raises(ValueError, match="before ZCA"):
        ds.with_zca().resized(32)
    with pytest.raises(ValueError, match="positive"):
        ds.resized(0)


# ----------------------------------------------------------------------------- ZCA

def test_zca_inverse_round_trip_and_whitening():
    ds = load_dataset("digits")
    zca = ZCA.fit(ds.train_images, eps=0.1)
    x = ds.test_images
    assert torch.allclose(zca.inverse(zca.transform(x)), x, atol=1e-4)
    # kornia's definition: whitened covariance = U diag(S / (S + eps)) U^T
    flat = ds.train_images.flatten(1).double()
    cov = torch.cov(flat.T)
    white = zca.transform(ds.train_images).flatten(1).double()
    eigenvalues = torch.linalg.eigvalsh(cov).clamp_min(0)
    assert torch.allclose(torch.linalg.eigvalsh(torch.cov(white.T)), eigenvalues / (eigenvalues + 0.1), atol=1e-4)


def test_zca_rgb_round_trip_and_save_restore(tmp_path):
    images = torch.rand(300, 3, 8, 8)
    zca = ZCA.fit(images)
    x = torch.rand(10, 3, 8, 8)
    assert torch.allclose(zca.inverse(zca.transform(x)), x, atol=1e-4)
    zca.save(tmp_path / "zca.safetensors")
    restored = ZCA.load(tmp_path / "zca.safetensors")
    assert restored.eps == 0.1
    assert torch.equal(restored.transform(x), zca.transform(x))
    with pytest.raises(ValueError, match="fitted on 192 features"):
        zca.transform(torch.rand(2, 1, 8, 8))


def test_dataset_with_zca_whitens_both_splits_and_denormalizes():
    ds = load_dataset("digits")
    white = load_dataset("digits", zca=True)
    assert white.zca is not None
    assert torch.allclose(white.zca.transform(ds.denormalize(ds.test_images)), white.test_images, atol=1e-5)
    pixels = white.denormalize(white.train_images[:4])
    assert torch.allclose(pixels, ds.denormalize(ds.train_images[:4]), atol=1e-4)
    assert pixels.min() >= -1e-4 and pixels.max() <= 1 + 1e-4


def test_zca_whitens_pixels_as_the_original_code_does():
    """The original fits kornia's ZCA (eps 0.1) on [0, 1] pixels, not normalised ones (which would regularise
    as eps 0.1 * std^2 on pixels): the whitened training set, from an independent computation on pixels."""
    white = load_dataset("digits", zca=True)
    train_pixels = white.denormalize(white.train_images).double()
    assert (train_pixels * 16 - (train_pixels * 16).round()).abs().max() < 1e-3  # the 17 grey levels of digits
    flat = train_pixels.flatten(1)
    centred = flat - flat.mean(0)
    eigenvalues, eigenvectors = torch.linalg.eigh(centred.T @ centred / (len(flat) - 1))
    matrix = eigenvectors @ torch.diag(1 / torch.sqrt(eigenvalues.clamp_min(0) + 0.1)) @ eigenvectors.T
    assert torch.allclose(white.train_images.flatten(1).double(), centred @ matrix, atol=1e-4)


def test_cifar100_is_normalised_with_the_original_codes_statistics():
    """The original normalises CIFAR-100 with CIFAR-10's mean and std; its presets and experts live there."""
    assert SPECS["cifar100"].mean == SPECS["cifar10"].mean == (0.4914, 0.4822, 0.4465)
    assert SPECS["cifar100"].std == SPECS["cifar10"].std == (0.2023, 0.1994, 0.2010)


def test_tiny_imagenet_classes_are_numbered_in_sorted_order(tmp_path):
    """The original reads Tiny ImageNet with torchvision's ImageFolder, which numbers the class folders sorted;
    wnids.txt lists them in another order."""
    from PIL import Image
    wnids = ["n03", "n01", "n02"]
    (tmp_path / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (tmp_path / "words.txt").write_text("n01\tgoldfish, Carassius auratus\nn02\tbullfrog\nn03\ttabby, cat\n")
    annotations = []
    for k, wnid in enumerate(wnids):
        (tmp_path / "train" / wnid / "images").mkdir(parents=True)
        Image.new("RGB", (64, 64), (80 * k, 0, 0)).save(tmp_path / "train" / wnid / "images" / f"{wnid}_0.JPEG")
        (tmp_path / "val" / "images").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (64, 64), (80 * k, 0, 0)).save(tmp_path / "val" / "images" / f"val_{k}.JPEG")
        annotations.append(f"val_{k}.JPEG\t{wnid}\t0\t0\t64\t64")
    (tmp_path / "val" / "val_annotations.txt").write_text("\n".join(annotations) + "\n")
    train_x, train_y, test_x, test_y, classes = _read_tiny_imagenet(tmp_path)
    assert classes == ["goldfish", "bullfrog", "tabby"]
    assert train_y.tolist() == [0, 1, 2] and [round(int(x[0, 0, 0]) / 80) for x in train_x] == [1, 2, 0]
    assert test_y.tolist() == [2, 0, 1]


def test_a_data_root_without_the_dataset_is_said_to_be_passed_over(tmp_path, capsys):
    """--data-root mistyped: the copy found elsewhere is used, with one `warning:` line saying so."""
    if not FASHION_DIR.exists():
        pytest.skip("apt-get install dataset-fashion-mnist to run this test")
    from mtt.cli import main
    assert main(["baseline", "--dataset", "fashion-mnist", "--ipc", "1", "--epochs", "1", "--repeats", "1",
                 "--width", "8", "--data-root", str(tmp_path), "--device", "cpu", "--no-progress"]) == 0
    warning = capsys.readouterr().err.splitlines()[0]  # the copy: ./data's or the Debian package's
    assert warning.startswith(f"warning: fashion-mnist is not in {tmp_path} (the data root given): using the copy in ")


# ----------------------------------------------------------------------------- files that are not the dataset

def write_cifar10(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(1, 6):
        write_cifar_batch(folder / f"data_batch_{i}", 20, 10, b"labels", seed=i)
    write_cifar_batch(folder / "test_batch", 10, 10, b"labels", seed=9)


def test_files_that_are_not_the_dataset_asked_for_are_refused(tmp_path):
    if FASHION_DIR.exists():  # MNIST's and Fashion-MNIST's files look alike: told apart by their labels
        with pytest.raises(ValueError, match="holds fashion-mnist, not mnist"):
            load_dataset("mnist", root=FASHION_DIR, download=False)
    write_cifar10(tmp_path / "counts")
    with open(tmp_path / "counts" / "test_batch", "wb") as f:  # 10 images, 3 labels
        pickle.dump({b"data": np.zeros((10, 3072), np.uint8), b"labels": [0, 1, 2]}, f, protocol=2)
    with pytest.raises(ValueError, match="test set holds 10 images of 3x32x32 and 3 labels"):
        load_dataset("cifar10", root=tmp_path / "counts", download=False)
    write_cifar10(tmp_path / "range")
    with open(tmp_path / "range" / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 57]}, f, protocol=2)
    with pytest.raises(ValueError, match="test labels run from 0 to 57, where cifar10 has classes 0..9"):
        load_dataset("cifar10", root=tmp_path / "range", download=False)
    write_mnist(tmp_path / "big")
    write_idx(tmp_path / "big" / "train-images-idx3-ubyte", np.zeros((50, 32, 32)), gz=True)
    with pytest.raises(ValueError, match="50 images of 1x32x32 and 50 labels, where mnist has 1x28x28"):
        load_dataset("mnist", root=tmp_path / "big", download=False)


def test_damaged_or_incomplete_files_are_named_in_one_line(tmp_path):
    write_mnist(tmp_path / "empty", gz=False)
    (tmp_path / "empty" / "t10k-labels-idx1-ubyte").write_bytes(b"")
    write_cifar10(tmp_path / "list")
    with open(tmp_path / "list" / "data_batch_3", "wb") as f:
        pickle.dump([1, 2, 3], f, protocol=2)
    write_cifar10(tmp_path / "incomplete")
    (tmp_path / "incomplete" / "data_batch_2").unlink()
    write_cifar10(tmp_path / "garbage")
    (tmp_path / "garbage" / "test_batch").write_bytes(b"P garbage that pickle reads as a persistent id\n")
    for name, folder, said in [("mnist", "empty", "holds a damaged copy of mnist"),
                               ("cifar10", "list", "holds a damaged copy of cifar10"),
                               ("cifar10", "incomplete", "holds an incomplete copy of cifar10: .*data_batch_2 is "
                                                         "missing; put back the whole folder"),
                               ("cifar10", "garbage", "test_batch is truncated or not a CIFAR pickle")]:
        with pytest.raises(ValueError, match=said) as err:
            load_dataset(name, root=tmp_path / folder, download=False)
        assert "\n" not in str(err.value)


def write_tiny(folder: Path, wnids: list[str], val_in_class_folders: bool) -> None:
    from PIL import Image
    (folder / "val" / "images").mkdir(parents=True)
    (folder / "wnids.txt").write_text("\n".join(wnids) + "\n")
    annotations = []
    for k, wnid in enumerate(wnids):
        (folder / "train" / wnid / "images").mkdir(parents=True)
        Image.new("RGB", (64, 64), (80 * k, 0, 0)).save(folder / "train" / wnid / "images" / f"{wnid}_0.JPEG")
        val = folder / "val" / "images" / (wnid if val_in_class_folders else "")
        val.mkdir(exist_ok=True)
        Image.new("RGB", (64, 64), (80 * k, 0, 0)).save(val / f"val_{k}.JPEG")
        annotations.append(f"val_{k}.JPEG\t{wnid}\t0\t0\t64\t64")
    if not val_in_class_folders:
        (folder / "val" / "val_annotations.txt").write_text("\n".join(annotations) + "\n\n")


def test_tiny_imagenet_validation_images_as_downloaded_or_in_class_folders(tmp_path):
    """As downloaded, the validation images lie in one folder, their classes in val_annotations.txt; the original's
    ImageFolder reads them sorted into class folders, as its users have them: both read alike."""
    write_tiny(tmp_path / "flat", ["n02", "n01"], val_in_class_folders=False)
    write_tiny(tmp_path / "sorted", ["n02", "n01"], val_in_class_folders=True)
    flat, in_folders = _read_tiny_imagenet(tmp_path / "flat"), _read_tiny_imagenet(tmp_path / "sorted")
    assert in_folders[3].tolist() == [0, 1] and flat[3].tolist() == [1, 0]  # classes numbered sorted
    assert torch.equal(flat[2][flat[3].argsort()], in_folders[2])
    shutil.rmtree(tmp_path / "flat" / "train" / "n01")
    with pytest.raises(ValueError, match="incomplete copy of tiny-imagenet: .*train/n01/images is missing"):
        load_dataset("tiny-imagenet", root=tmp_path / "flat", download=False)
    assert dataset_key("Tiny") == "tiny-imagenet"  # the original's name for it
