"""Expert buffers: native shards, original MTT .pt files, the Hub offline; real files, real networks."""
import collections
import dataclasses
import functools
import json
import os
import pickle
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from mtt.buffers import (BufferDownloadError, BufferMeta, BufferUploadError, ExpertBuffers, download_buffers,
                         finished_experts, flatten_params, open_buffers, push_buffers, unflatten_params, write_index,
                         write_shard)
from mtt.io import load_safetensors
from mtt.networks import get_network

EPOCHS = 3


def small_net(name="ConvNet", channels=1, size=8, width=16):
    return get_network(name, channels, 10, (size, size), width=width)


def meta_for(net, **overrides):
    kw = dict(dataset="digits", model="ConvNet", channels=1, im_size=(8, 8), num_classes=10, zca=False,
              lr=0.01, epochs=EPOCHS) | overrides
    return BufferMeta.for_network(net, **kw)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # these networks are tiny: extra threads only add contention (10-50x slower on a busy 2-core machine)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.lru_cache(maxsize=None)
def train(seed, channels=1, size=8):
    """A real (tiny) expert: SGD on random data; its parameters (as tensors) at each epoch."""
    torch.manual_seed(seed)
    net = small_net(channels=channels, size=size)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    x, y = torch.randn(32, channels, size, size), torch.randint(0, 10, (32,))
    snapshots = [[p.detach().clone() for p in net.parameters()]]
    for _ in range(EPOCHS):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
        snapshots.append([p.detach().clone() for p in net.parameters()])
    return snapshots


def trajectories(seeds):
    return torch.stack([torch.stack([flatten_params(s) for s in train(seed)]) for seed in seeds])


@pytest.fixture
def folder(tmp_path):
    """Two shards, experts 0-1 (with test accuracies) and 5-6."""
    meta = meta_for(small_net())
    write_shard(tmp_path / "a.safetensors", trajectories([0, 1]), meta, [0, 1], torch.rand(2, EPOCHS))
    write_shard(tmp_path / "b.safetensors", trajectories([5, 6]), meta, [5, 6])
    return tmp_path


# ----------------------------------------------------------------------------- native

def test_round_trip(tmp_path):
    net = small_net()
    meta = meta_for(net)
    traj_a, traj_b = trajectories([0, 1]), trajectories([2])
    acc = torch.rand(2, EPOCHS)
    write_shard(tmp_path / "a.safetensors", traj_a, meta, [3, 1], acc)
    write_shard(tmp_path / "b.safetensors", traj_b, meta, [7])
    index = write_index(tmp_path)
    assert index.name == "index.json"

    buffers = ExpertBuffers.open(tmp_path, dataset="digits", model="ConvNet", channels=1, im_size=8,
                                 num_classes=10, zca=False, network=net)
    assert buffers.meta == meta and buffers.meta.num_params == sum(p.numel() for p in net.parameters())
    assert len(buffers) == 3 and buffers.expert_ids == [1, 3, 7]  # i indexes the sorted ids
    expected = {1: traj_a[1], 3: traj_a[0], 7: traj_b[0]}
    for i, eid in enumerate(buffers.expert_ids):
        assert torch.equal(buffers.trajectory(i), expected[eid])
        for epoch in range(EPOCHS + 1):
            assert torch.equal(buffers.snapshot(i, epoch), expected[eid][epoch])
    assert torch.equal(buffers.snapshot(0, -1), expected[1][EPOCHS])
    assert torch.equal(buffers.test_acc(0), acc[1]) and torch.equal(buffers.test_acc(1), acc[0])
    assert buffers.test_acc(2) is None
    assert buffers.locate(1) == f"expert 3 in {tmp_path / 'a.safetensors'}"

    one = ExpertBuffers.open(tmp_path / "b.safetensors")  # a single shard opens on its own
    assert one.expert_ids == [7] and torch.equal(one.trajectory(0), traj_b[0])


def test_flatten_unflatten_reproduces_the_network(tmp_path):
    net = small_net()
    meta = meta_for(net)
    x = torch.randn(4, 1, 8, 8)
    flat = flatten_params(net)
    assert flat.shape == (meta.num_params,) and not flat.requires_grad
    params = unflatten_params(flat, meta)
    assert list(params) == list(meta.param_names)
    assert all(p.data_ptr() >= flat.data_ptr() for p in params.values()) and params["classifier.bias"]._base is flat
    assert torch.allclose(functional_call(net, params, (x,)), net(x))

    # through a file, and with gradients flowing back to the flat vector (as the student needs)
    write_shard(tmp_path / "s.safetensors", torch.stack([flat * (1 + e) for e in range(EPOCHS + 1)])[None], meta, [0])
    theta = ExpertBuffers.open(tmp_path).snapshot(0, 0).requires_grad_()
    out = functional_call(net, unflatten_params(theta, meta), (x,))
    assert torch.allclose(out, net(x))
    out.sum().backward()
    assert theta.grad.shape == theta.shape

    batched = unflatten_params(torch.stack([flat, flat]), meta)  # [K, P] for vmap over experts
    assert batched["classifier.weight"].shape == (2, *net.classifier.weight.shape)
    with pytest.raises(ValueError, match=f"{meta.num_params} entries"):
        unflatten_params(flat[:-1], meta)


def test_meta_survives_the_file_and_index(folder):
    meta = meta_for(small_net())
    write_index(folder)
    assert ExpertBuffers.open(folder).meta == meta
    assert ExpertBuffers.open(folder / "index.json").meta == meta
    assert open_buffers(str(folder), dataset="digits").meta == meta


def test_snapshot_reads_one_row_only(tmp_path):
    """Opening a big shard and reading one snapshot maps in a row, not the file (RSS grows by << its size)."""
    statm = "/proc/self/statm"
    if not os.path.exists(statm):
        pytest.skip("needs /proc to measure resident memory")

    def rss():
        return int(open(statm).read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    K, P = 20, 100_000
    meta = BufferMeta("digits", "Big", 1, (8, 8), 10, False, 0.01, 10, ("w",), ((P,),))
    traj = torch.randn(K, 11, P)
    path = write_shard(tmp_path / "big.safetensors", traj, meta, range(K))
    row = traj[13, 7].clone()
    del traj
    size = path.stat().st_size
    assert size > 80e6

    before, start = rss(), time.perf_counter()
    buffers = ExpertBuffers.open(path)
    snap = buffers.snapshot(13, 7)
    elapsed, grown = time.perf_counter() - start, rss() - before
    assert torch.equal(snap, row)
    assert elapsed < 1.0
    assert grown < size / 10, f"resident memory grew {grown / 1e6:.1f} MB reading a row of a {size / 1e6:.0f} MB shard"

    # the measurement does see a full read (safetensors maps files too, so touch every value)
    before = rss()
    everything = load_safetensors(path)
    assert torch.isfinite(sum(t.sum() for t in everything.values()))
    assert rss() - before > size / 2


@pytest.mark.parametrize("settings, refused", [(dict(zca=True), True), (dict(dataset="cifar100"), True),
                                               (dict(zca=False), False)])
def test_experts_of_mtt_0_1_in_a_space_that_changed_are_refused(tmp_path, settings, refused):
    """mtt 0.1 whitened normalised images and normalised CIFAR-100 with its own statistics; the space is the
    original code's since 0.2, so such experts would be matched on other images than they were trained on."""
    meta = dataclasses.replace(meta_for(small_net(), **settings), version="0.1.0")
    write_shard(tmp_path / "a.safetensors", trajectories([0]), meta, [0])
    if not refused:
        assert ExpertBuffers.open(tmp_path).meta.version == "0.1.0"
        return
    with pytest.raises(ValueError, match=r"a.safetensors: written by mtt 0\.1\.0, whose .*another space.*"
                                         r"train these experts again"):
        ExpertBuffers.open(tmp_path)
    current = dataclasses.replace(meta, version="0.2.0")
    write_shard(tmp_path / "a.safetensors", trajectories([0]), current, [0])
    assert len(ExpertBuffers.open(tmp_path)) == 1


def test_mismatched_model_is_refused(folder):
    with pytest.raises(ValueError, match=r"model ConvNet on digits.*requested model='ConvNetD4' \(buffer has 'Con"):
        ExpertBuffers.open(folder, model="ConvNetD4")
    with pytest.raises(ValueError, match=r"channels=3 \(buffer has 1\).*im_size=\(32, 32\)"):
        ExpertBuffers.open(folder, channels=3, im_size=32)
    with pytest.raises(ValueError, match=r"zca=True \(buffer has False \(--no-zca to match\)\)"):
        ExpertBuffers.open(folder, zca=True)
    # a network with other shapes: names which parameter and what the buffer was made for
    with pytest.raises(ValueError, match=r"for model ConvNet on digits.*parameter 0.*\(16, 1, 3, 3\).*\(16, 3, 3, 3\)"):
        ExpertBuffers.open(folder, network=small_net(channels=3))
    with pytest.raises(ValueError, match=r"parameter 8: buffer has 'features.8.weight'.*network has 'classifier"):
        ExpertBuffers.open(folder, network=small_net("ConvNetD2"))


def test_truncated_shard_is_reported(folder):
    path = folder / "b.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    for call in (ExpertBuffers.open, finished_experts, write_index):
        with pytest.raises(ValueError, match=r"b\.safetensors is truncated or corrupt.*delete it"):
            call(folder)


def rewrite(path, change_tensors=lambda t: t, **metadata):
    """The shard at `path` as another tool might have written it: tensors and metadata changed."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(str(path), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file(change_tensors(tensors), str(path), meta | metadata)


def test_metadata_of_a_network_with_an_empty_parameter_is_mtts_own():
    meta = meta_for(small_net())
    assert BufferMeta(**(dataclasses.asdict(meta) | {"param_shapes": [*meta.param_shapes[:-1], (0,)]}))


def test_shards_written_by_other_tools(folder):
    """Shards mtt did not write: other float types are read as float32; anything else is one error naming the file
    and what is wrong (they raised deep in torch, or at the first iteration)."""
    expected = ExpertBuffers.open(folder).trajectory(2)  # expert 5, in b.safetensors
    rewrite(folder / "b.safetensors", lambda t: {k: v.half() for k, v in t.items()})
    got = ExpertBuffers.open(folder).trajectory(2)
    assert got.dtype == torch.float32 and torch.allclose(got, expected, atol=1e-2)
    rewrite(folder / "b.safetensors", lambda t: {k: v.long() for k, v in t.items()})
    with pytest.raises(ValueError, match=r"b\.safetensors: expert_00005 holds I64 numbers, where mtt writes float32"):
        ExpertBuffers.open(folder)
    rewrite(folder / "b.safetensors", lambda t: {})
    with pytest.raises(ValueError, match=r"b\.safetensors holds no expert trajectory"):
        ExpertBuffers.open(folder)
    write_shard(folder / "b.safetensors", trajectories([5, 6]), meta_for(small_net()), [5, 6])
    for field, value in (("zca", '"no"'), ("epochs", '"3"'), ("epochs", "3.0"), ("lr", "-1"), ("channels", "0"),
                         ("param_shapes", "[" * 100000 + "]" * 100000)):
        rewrite(folder / "b.safetensors", **{field: value})
        with pytest.raises(ValueError, match=r"b\.safetensors has unreadable buffer metadata"):
            ExpertBuffers.open(folder)
    write_shard(folder / "b.safetensors", trajectories([5, 6]), meta_for(small_net()), [5, 6])
    for shards in ("null", '"b.safetensors"', "[" * 100000 + "]" * 100000):
        (folder / "index.json").write_text(f'{{"shards": {shards}}}')
        with pytest.raises(ValueError, match=r"index\.json is not a valid buffer index"):
            ExpertBuffers.open(folder)


def test_finished_experts(folder, tmp_path_factory):
    (folder / ".c.safetensors.x1y2.tmp").write_bytes(b"half a shard")  # an interrupted atomic write
    os.mkfifo(folder / "d.safetensors")  # no file: reading it would block forever
    assert finished_experts(folder) == {0, 1, 5, 6}
    assert len(ExpertBuffers.open(folder)) == 4
    os.symlink(folder / "gone.safetensors", folder / "e.safetensors")  # a link to nothing: broken, not skipped
    with pytest.raises(ValueError, match=r"e\.safetensors is truncated or corrupt"):
        ExpertBuffers.open(folder)
    assert finished_experts(tmp_path_factory.mktemp("empty") / "not-yet") == set()


def test_duplicate_experts_are_refused(folder):
    write_shard(folder / "c.safetensors", trajectories([9]), meta_for(small_net()), [5])
    for call in (write_index, ExpertBuffers.open):
        with pytest.raises(ValueError, match=r"expert 5 is in both b\.safetensors and c\.safetensors"):
            call(folder)


def test_shards_of_different_experts_are_refused(folder):
    write_shard(folder / "c.safetensors", trajectories([9]), meta_for(small_net(), lr=0.001), [9])
    with pytest.raises(ValueError, match=r"shards disagree.*lr=0\.01.*lr=0\.001"):
        write_index(folder)


def test_incomplete_copy_and_stale_index(folder):
    write_index(folder)
    write_shard(folder / "c.safetensors", trajectories([9]), meta_for(small_net()), [9])
    with pytest.warns(UserWarning, match="stale index"):
        assert len(ExpertBuffers.open(folder)) == 5
    (folder / "a.safetensors").unlink()
    with pytest.raises(ValueError, match=r"a\.safetensors.*incomplete"):
        ExpertBuffers.open(folder)


def test_bad_indices_and_shapes(folder):
    buffers = ExpertBuffers.open(folder)
    with pytest.raises(IndexError, match=r"expert index 4 out of range.*4 experts"):
        buffers.trajectory(4)
    with pytest.raises(IndexError, match=rf"epoch {EPOCHS + 1} out of range.*{EPOCHS} epochs"):
        buffers.snapshot(0, EPOCHS + 1)
    meta = meta_for(small_net())
    with pytest.raises(ValueError, match=r"\[K, epochs\+1, P\]"):
        write_shard(folder / "x.safetensors", torch.zeros(1, EPOCHS, meta.num_params), meta, [0])
    with pytest.raises(ValueError, match="distinct"):
        write_shard(folder / "x.safetensors", torch.zeros(2, EPOCHS + 1, meta.num_params), meta, [1, 1])
    with pytest.raises(FileNotFoundError, match="python -m mtt experts"):
        ExpertBuffers.open(folder / "nothing-here")


# ----------------------------------------------------------------------------- legacy

def write_legacy(root, dataset_dir="digits_NO_ZCA", model="ConvNet", files=((0, 1), (2,)), **net_kw):
    """The original layout: replay_buffer_{n}.pt, each a list of trajectories of per-parameter lists."""
    folder = root / dataset_dir / model
    folder.mkdir(parents=True)
    written = []
    for n, seeds in enumerate(files):
        trajs = [train(seed, **net_kw) for seed in seeds]
        torch.save(trajs, folder / f"replay_buffer_{n}.pt")
        written += trajs
    return folder, written


def test_legacy_file_with_a_record_shorter_than_its_tensor_is_refused(tmp_path):
    """Memory-mapped, torch reads a damaged record's tensor from the bytes after it: refused, not experts of
    garbage (or NaN) found only when drawn."""
    import zipfile
    folder, _ = write_legacy(tmp_path, files=((0,),))
    path = folder / "replay_buffer_0.pt"
    with zipfile.ZipFile(path) as archive:
        records = {info.filename: archive.read(info) for info in archive.infolist()}
    victim = next(name for name, data in records.items() if "/data/" in name and len(data) > 1000)
    records[victim] = records[victim][:8]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for name, data in records.items():
            archive.writestr(name, data)
    with pytest.raises(ValueError, match=r"replay_buffer_0\.pt is truncated or corrupt: its tensors need \d+ bytes"):
        ExpertBuffers.open(tmp_path, dataset="digits", zca=False)


def test_legacy_round_trip(tmp_path):
    folder, written = write_legacy(tmp_path)
    net = small_net()
    for path in (tmp_path, folder):  # the root, or the model folder itself
        buffers = ExpertBuffers.open(path, network=net, dataset="digits", model="ConvNet", zca=False)
        assert len(buffers) == 3 and buffers.meta == meta_for(net)
        for i, traj in enumerate(written):
            expected = torch.stack([flatten_params(s) for s in traj])
            assert torch.equal(buffers.trajectory(i), expected)
            assert torch.equal(buffers.snapshot(i, 2), flatten_params(traj[2]))
            assert buffers.test_acc(i) is None
    one = ExpertBuffers.open_legacy(folder / "replay_buffer_1.pt", network=net, dataset="digits",
                                    model="ConvNet", zca=False)
    assert len(one) == 1 and torch.equal(one.snapshot(0, 0), flatten_params(written[2][0]))
    assert one.locate(0) == f"trajectory 0 of {folder / 'replay_buffer_1.pt'}"  # how a damaged one is named


@pytest.mark.parametrize("folder_name,dataset,zca,channels,size", [
    ("CIFAR10", "cifar10", True, 3, 32),
    ("MNIST", "mnist", False, 1, 28),  # the original adds _NO_ZCA for CIFAR only
])
def test_legacy_original_dataset_names(tmp_path, folder_name, dataset, zca, channels, size):
    # the original code names folders after its dataset names; sizes come from the dataset
    write_legacy(tmp_path, dataset_dir=folder_name, files=((0,),), channels=channels, size=size)
    net = small_net(channels=channels, size=size)
    buffers = ExpertBuffers.open(tmp_path, network=net, dataset=dataset, model="ConvNet", zca=zca)
    assert (buffers.meta.dataset, buffers.meta.channels, buffers.meta.im_size) == (dataset, channels, (size, size))
    if dataset == "cifar10":  # a plain CIFAR10 folder holds ZCA experts: not for zca=False
        with pytest.raises(ValueError, match=r"trained with ZCA \(its folder name says so\).*pass --zca to use them"):
            ExpertBuffers.open(tmp_path, network=net, dataset=dataset, model="ConvNet", zca=False)
    with pytest.raises(ValueError, match=rf"holds experts of {dataset} \(its folder name says so\), not svhn: pass "
                                         rf"--dataset {dataset}"):
        ExpertBuffers.open(tmp_path / folder_name / "ConvNet", dataset="svhn")


def test_legacy_wrong_network(tmp_path):
    folder, _ = write_legacy(tmp_path)
    with pytest.raises(ValueError, match=r"replay_buffer_0\.pt: it holds 14 tensors per snapshot but ConvNetD2 on "
                                         r"1x8x8 has 10 parameters; was it made for another model or dataset\?"):
        ExpertBuffers.open_legacy(folder, network=small_net("ConvNetD2"), dataset="digits", model="ConvNetD2",
                                  zca=False)
    with pytest.raises(ValueError, match=r"parameter 0 is \(16, 1, 3, 3\) but ConvNet on 1x8x8 expects \(8, 1, 3, 3\)"):
        ExpertBuffers.open_legacy(folder, network=small_net(width=8), dataset="digits", model="ConvNet", zca=False)
    with pytest.raises(ValueError, match=r"original MTT format, which does not record the dataset.*--dataset"):
        ExpertBuffers.open(folder)
    with pytest.raises(ValueError, match=r"expects \(8, 1, 3, 3\); leave out --width 8: the network's sizes are "
                                         r"otherwise read from the files"):
        open_buffers(folder, dataset="digits", zca=False, width=8)


@pytest.mark.parametrize("where", ["root", "dataset folder", "model folder", "one file"])
def test_legacy_opens_without_a_network_in_every_original_layout(tmp_path, where):
    """The model comes from the folder name, ZCA from the dataset folder's, width and depth from the tensors."""
    folder, written = write_legacy(tmp_path)
    path = {"root": tmp_path, "dataset folder": folder.parent, "model folder": folder,
            "one file": folder / "replay_buffer_0.pt"}[where]
    buffers = open_buffers(path, dataset="digits", zca=False)
    assert buffers.meta == meta_for(small_net())  # width 16 read from the files, not the default 128
    assert buffers.meta.convnet_size() == (16, 3)
    assert len(buffers) == (2 if where == "one file" else 3)
    assert torch.equal(buffers.snapshot(1, 2), flatten_params(written[1][2]))


def test_legacy_zca_read_from_the_folder_name(tmp_path):
    write_legacy(tmp_path, dataset_dir="CIFAR10_NO_ZCA", files=((0,),), channels=3, size=32)
    model_folder = tmp_path / "CIFAR10_NO_ZCA" / "ConvNet"
    assert not open_buffers(model_folder, dataset="cifar10").meta.zca
    for where in (model_folder, tmp_path):  # from the root too: found, and refused naming the flag that takes them
        with pytest.raises(ValueError, match=r"trained without ZCA \(its folder name says so\), but this run asks "
                                             r"for zca=True \(by the preset, or --zca/--no-zca\): pass --no-zca"):
            open_buffers(where, dataset="cifar10", zca=True)
    bare = tmp_path / "bare" / "replay_buffer_0.pt"  # a file outside the layout says nothing about ZCA
    bare.parent.mkdir()
    bare.write_bytes((model_folder / "replay_buffer_0.pt").read_bytes())
    with pytest.raises(ValueError, match="--zca or --no-zca"):
        open_buffers(bare, dataset="cifar10")
    assert open_buffers(bare, dataset="cifar10", zca=True).meta.zca


@pytest.mark.parametrize("content, said", [
    ([], "it holds an empty list, not a list of trajectories"),
    ({"a": 1}, "it holds a dict, not a list of trajectories"),
    ([[torch.zeros(2)]], r"trajectory 0 holds 1 snapshot\(s\), where a trajectory has at least 2"),
    ([[collections.OrderedDict(a=torch.zeros(2)), collections.OrderedDict(a=torch.zeros(2))]],
     "trajectory 0, snapshot 0 is an OrderedDict, not a list of parameters"),
])
def test_legacy_files_that_are_no_buffers_are_named_so(tmp_path, content, said):
    (tmp_path / "ConvNet").mkdir()
    torch.save(content, tmp_path / "ConvNet" / "replay_buffer_0.pt")
    with pytest.raises(ValueError, match=rf"replay_buffer_0\.pt is not a replay buffer of the original code: {said}"):
        ExpertBuffers.open_legacy(tmp_path / "ConvNet", dataset="digits", model="ConvNet", zca=False,
                                  network=small_net())


def test_legacy_files_as_the_original_reads_them(tmp_path):
    """replay_buffer_{n}.pt in the order of n; other names are not part of the buffer."""
    folder, written = write_legacy(tmp_path, files=[(k,) for k in range(11)])
    torch.save(written[:1], folder / "replay_buffer_old.pt")
    buffers = open_buffers(folder, dataset="digits", zca=False)
    assert len(buffers) == 11 and buffers.locate(10) == f"trajectory 0 of {folder / 'replay_buffer_10.pt'}"


def test_legacy_experts_saved_without_copying_are_refused(tmp_path):
    """The original's buffer.py on a CPU saves `p.detach().cpu()`, the live parameters themselves: every epoch then
    holds the final weights, start and target are equal, and the matching loss divides by zero."""
    net = small_net()
    (tmp_path / "ConvNet").mkdir()
    torch.save([[list(net.parameters())] * 3], tmp_path / "ConvNet" / "replay_buffer_0.pt")
    with pytest.raises(ValueError, match=r"trajectory 0 holds the same parameters at epoch 0 and epoch 2.*saved "
                                         r"without being copied"):
        open_buffers(tmp_path / "ConvNet", dataset="digits", zca=False)


def test_legacy_models_mtt_does_not_build_are_named(tmp_path):
    write_legacy(tmp_path, model="ConvNetKIP", files=((0,),))
    with pytest.raises(ValueError, match=r"original code's ConvNetKIP, a network mtt does not build .*pass --model"):
        open_buffers(tmp_path / "digits_NO_ZCA" / "ConvNetKIP", dataset="digits", zca=False)
    assert len(open_buffers(tmp_path / "digits_NO_ZCA" / "ConvNetKIP", dataset="digits", zca=False,
                            model="ConvNet")) == 1  # its tensors are a ConvNet's: named, it is read


def test_legacy_several_models_need_a_name(tmp_path):
    write_legacy(tmp_path, files=((0,),))
    write_legacy(tmp_path, model="ConvNetAL", files=((1,),))
    with pytest.raises(ValueError, match=r"several sets of original-MTT experts \(digits_NO_ZCA/ConvNet, "
                                         r"digits_NO_ZCA/ConvNetAL\): name the model \(--model"):
        open_buffers(tmp_path, dataset="digits", zca=False)
    assert open_buffers(tmp_path, dataset="digits", zca=False, model="ConvNetAL").meta.model == "ConvNetAL"
    with pytest.raises(FileNotFoundError, match=r"no experts of ConvNetW32 in .*: it holds original-MTT experts in "
                                                r"digits_NO_ZCA/ConvNet, digits_NO_ZCA/ConvNetAL; pass that model"):
        open_buffers(tmp_path, dataset="digits", zca=False, model="ConvNetW32")


def test_open_buffers_refuses_what_is_not_a_path():
    with pytest.raises(TypeError, match="buffers must be a folder, a file or an 'hf://OWNER/REPO' address, got int 123"):
        open_buffers(123)
    with pytest.raises(TypeError, match="zca must be True, False or None, got 'no'"):
        ExpertBuffers.open(".", zca="no")


class Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's note on the plain pickle
@pytest.mark.parametrize("save", ["torch", "pickle"])
def test_legacy_malicious_pickle_is_refused(tmp_path, save):
    pwned = tmp_path / "pwned"
    path = tmp_path / "replay_buffer_0.pt"
    payload = [[[Evil(pwned)]]]
    if save == "torch":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f)
    # torch.save's file names the function it would call; a plain pickle is no torch.save file at all
    refused = {"torch": r"refusing to load .*replay_buffer_0\.pt: it needs arbitrary code to unpickle \(\w+\.system\)",
               "pickle": r"replay_buffer_0\.pt is truncated or corrupt, or no torch.save file"}[save]
    with pytest.raises(ValueError, match=refused):
        ExpertBuffers.open(path, network=small_net(), dataset="digits", model="ConvNet", zca=False)
    assert not pwned.exists()


def test_legacy_truncated_file(tmp_path):
    folder, _ = write_legacy(tmp_path, files=((0,),))
    path = folder / "replay_buffer_0.pt"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"replay_buffer_0\.pt is truncated or corrupt, or no torch.save file"):
        ExpertBuffers.open(path, network=small_net(), dataset="digits", model="ConvNet", zca=False)


# ----------------------------------------------------------------------------- Hub, offline

REPO = "someone/mtt-buffers"


@pytest.fixture
def no_network(monkeypatch):
    """No route to anywhere, and no proxy: every TCP connection fails at once."""
    def refuse(*args, **kwargs):
        raise OSError("network unreachable (test)")
    monkeypatch.setattr(socket, "create_connection", refuse)
    for name in ("http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


def test_download_offline_without_cache_fails_fast(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(BufferDownloadError) as err:
        download_buffers(REPO, "cifar10/ConvNet", cache_dir=tmp_path)
    assert time.perf_counter() - start < 10
    msg = str(err.value)
    assert REPO in msg and "cifar10/ConvNet" in msg and "HF_HUB_OFFLINE" in msg
    assert "python -m mtt experts" in msg and "--buffers DIR" in msg
    assert isinstance(err.value, FileNotFoundError)


def test_download_unreachable_fails_fast(tmp_path, monkeypatch, no_network):
    from huggingface_hub import constants
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    start = time.perf_counter()
    with pytest.raises(BufferDownloadError, match=r"someone/mtt-buffers.*revision 'v1'.*cannot be reached"):
        download_buffers(REPO, "cifar10", revision="v1", cache_dir=tmp_path)
    assert time.perf_counter() - start < 10


def cached_snapshot(cache, kind: str = "models") -> Path:
    """An empty snapshot of REPO at main in a Hub cache (huggingface_hub's layout; kind "datasets" for a dataset
    repo)."""
    repo = cache / f"{kind}--someone--mtt-buffers"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return repo / "snapshots" / commit


def test_download_uses_the_cache_offline(folder, tmp_path_factory, monkeypatch, no_network):
    """A snapshot already in the cache (huggingface_hub's layout) is used without any network."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path_factory.mktemp("hub")
    sub = cached_snapshot(cache) / "digits" / "ConvNet"
    sub.mkdir(parents=True)
    for shard in ("a.safetensors", "b.safetensors"):
        (sub / shard).write_bytes((folder / shard).read_bytes())

    got = download_buffers(REPO, "digits/ConvNet/", cache_dir=cache)
    assert got == sub
    assert ExpertBuffers.open(got, dataset="digits").expert_ids == [0, 1, 5, 6]
    # open_buffers (the CLI's --buffers) uses the default cache, which huggingface_hub reads at import
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    assert len(open_buffers(f"hf://{REPO}/digits/ConvNet@main", dataset="digits", zca=False)) == 4
    with pytest.raises(ValueError, match="hf://OWNER/REPO"):
        open_buffers("hf://mtt-buffers")
    # A repo's web address, copied from the browser, is no path: the hf:// address it means is named.
    with pytest.raises(ValueError, match=f"name a Hub repo as hf://{REPO}/digits/ConvNet@main "):
        open_buffers(f"https://huggingface.co/{REPO}/tree/main/digits/ConvNet")
    with pytest.raises(ValueError, match=f"name a Hub repo as hf://{REPO} "):
        open_buffers(f"HF://{REPO}")
    with pytest.raises(BufferDownloadError, match=r"sub-path 'cifar10'.*python -m mtt experts"):
        download_buffers(REPO, "cifar10", cache_dir=cache)  # cached repo, but not that folder


def cache_with_shards(folder, cache, kind: str = "models") -> Path:
    sub = cached_snapshot(cache, kind) / "digits" / "ConvNet"
    sub.mkdir(parents=True)
    for shard in ("a.safetensors", "b.safetensors"):
        (sub / shard).write_bytes((folder / shard).read_bytes())
    return sub


def test_hub_addresses_of_dataset_repos_and_files_and_none_out_of_the_repo(folder, tmp_path_factory, monkeypatch,
                                                                           no_network):
    """hf://datasets/OWNER/REPO/... reads a dataset repo; a file's web address names its folder; a sub-path cannot
    lead out of the repo's snapshot."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path_factory.mktemp("hub")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    cache_with_shards(folder, cache, "datasets")
    assert len(open_buffers(f"hf://datasets/{REPO}/digits/ConvNet", dataset="digits", zca=False)) == 4
    with pytest.raises(BufferDownloadError, match="a dataset repo"):
        open_buffers(f"hf://datasets/{REPO}/cifar10")
    with pytest.raises(BufferDownloadError, match="not in the local cache"):  # the model repo of that name: none
        open_buffers(f"hf://{REPO}/digits/ConvNet")
    web = f"https://huggingface.co/{REPO}/blob/main/digits/ConvNet/index.json"
    with pytest.raises(ValueError, match=f"name a Hub repo as hf://{REPO}/digits/ConvNet@main "):
        open_buffers(web)
    with pytest.raises(ValueError, match=f"name a Hub repo as hf://datasets/{REPO}/digits@v1 "):
        open_buffers(f"https://huggingface.co/datasets/{REPO}/tree/v1/digits")
    (cache / "elsewhere").mkdir()
    (cache / "elsewhere" / "a.safetensors").write_bytes((folder / "a.safetensors").read_bytes())
    for address in (f"hf://{REPO}/../../../../elsewhere", f"hf://datasets/{REPO}/digits/./ConvNet"):
        with pytest.raises(ValueError, match="may not hold '.' or '..' parts"):
            open_buffers(address)


def test_a_parent_of_expert_folders_names_them(folder, tmp_path_factory, monkeypatch, no_network):
    """A repo's root, or a folder above the experts: the error says where below it they are (a run's files are
    no experts)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path_factory.mktemp("hub")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    root = cache_with_shards(folder, cache).parent.parent
    (root / "runs" / "r1").mkdir(parents=True)
    (root / "runs" / "r1" / "synthetic.safetensors").write_bytes(b"not experts")
    write_legacy(root / "original")
    said = (r"no expert buffers in .* itself, but in 2 folder\(s\) below it: "
            r"digits/ConvNet, original/digits_NO_ZCA/ConvNet")
    with pytest.raises(FileNotFoundError, match=said):
        ExpertBuffers.open(root)
    with pytest.raises(FileNotFoundError, match=f"^hf://{REPO}@main: {said}: pass one of those"):
        open_buffers(f"hf://{REPO}@main")


def test_online_the_hub_is_asked_even_when_the_cache_holds_the_buffers(folder, tmp_path_factory, monkeypatch,
                                                                       recwarn):
    """A branch moves on and a download can be cut short: online, the Hub brings the cached copy up to date; should
    asking it fail, the cached copy is used, with a warning that it may be old."""
    import huggingface_hub
    from huggingface_hub import constants
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr("mtt.buffers.reachable", lambda url: True)
    cache = tmp_path_factory.mktemp("hub")
    sub = cache_with_shards(folder, cache)
    real, asked = huggingface_hub.snapshot_download, []

    def hub(**kwargs):
        if kwargs.get("local_files_only"):
            return real(**kwargs)
        asked.append(kwargs["revision"])
        if answers:
            return str(sub.parent.parent)  # what the Hub gave: the snapshot, brought up to date
        raise ConnectionError("the Hub timed out (test)")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub)
    answers = True
    assert download_buffers(REPO, "digits/ConvNet", revision="main", cache_dir=cache) == sub
    assert asked == ["main"] and not recwarn.list
    answers = False
    assert download_buffers(REPO, "digits/ConvNet", revision="main", cache_dir=cache) == sub
    assert asked == ["main", "main"]
    assert "failed (ConnectionError: the Hub timed out (test)): using the cached copy" in str(
        recwarn.pop(UserWarning).message)
    with pytest.raises(BufferDownloadError, match="ConnectionError: the Hub timed out"):
        download_buffers(REPO, "cifar10", cache_dir=cache)  # nothing cached to fall back on
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda **kwargs: real(**kwargs) if kwargs.get(
        "local_files_only") else json.loads("<html>a proxy's page</html>"))  # a ValueError, no malformed address
    assert download_buffers(REPO, "digits/ConvNet", cache_dir=cache) == sub
    assert "JSONDecodeError" in str(recwarn.pop(UserWarning).message)
    with pytest.raises(BufferDownloadError, match=r"some one/repo") as err:
        download_buffers("some one/repo", cache_dir=cache)  # malformed: said once, in one sentence
    assert ".. Alternatively" not in str(err.value)


def test_behind_a_proxy_the_hub_is_left_to_its_own_timeouts(monkeypatch, no_network):
    from mtt.io import reachable
    assert not reachable("https://huggingface.co")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    assert reachable("https://huggingface.co")  # the host is reached through the proxy, not directly


def test_download_uses_a_populated_local_dir_offline(folder, tmp_path_factory, monkeypatch, no_network):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    local = tmp_path_factory.mktemp("local")
    (local / "digits").mkdir()
    (local / "digits" / "a.safetensors").write_bytes((folder / "a.safetensors").read_bytes())
    got = download_buffers(REPO, "digits", local_dir=local, cache_dir=local / "cache")
    assert got == local / "digits" and len(ExpertBuffers.open(got)) == 2


def test_push_offline_and_empty_folder(folder, tmp_path_factory, monkeypatch, no_network):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(BufferUploadError, match=r"someone/mtt-buffers.*sub-path 'digits'.*offline"):
        push_buffers(folder, REPO, "digits")
    assert time.perf_counter() - start < 10
    assert (folder / "index.json").exists()  # the folder was checked and indexed before giving up
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors shards"):
        push_buffers(tmp_path_factory.mktemp("empty"), REPO)


def test_original_layout_from_the_hub_cache(tmp_path_factory, monkeypatch, no_network):
    """hf:// addresses reach original-MTT buffers too: the root of their layout, in the Hub cache."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path_factory.mktemp("hub")
    write_legacy(cached_snapshot(cache) / "original")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    buffers = open_buffers(f"hf://{REPO}/original@main", dataset="digits", zca=False)
    assert len(buffers) == 3 and buffers.meta.convnet_size() == (16, 3)
