"""Expert trajectories: train many networks on real data and keep every epoch's parameters.

Paper protocol (MTT, section 3): each expert starts from a fresh random initialisation and
trains `epochs` epochs with plain SGD (lr_teacher 0.01, batch 256, no momentum, no weight
decay, no lr decay) with DSA on the real training set (ZCA space when ZCA is on). We keep
epochs+1 snapshots (0 = initialisation) and the test accuracy after every epoch.

Two paths, same numbers. Sequential (P=1) is a plain nn.Module loop with torch.optim.SGD
and is the reference. Vectorised (P>1) stacks P networks with torch.func.stack_module_state
and takes each SGD step for all of them at once with vmap(grad(functional_call)). Expert k
draws its initialisation, data order and DSA parameters from its own stream seeded by
seed+k, so it follows the same batches whatever P, rank or world size it trains under.
"""
from __future__ import annotations

import copy
import math
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call, grad, stack_module_state, vmap
from tqdm.auto import tqdm

from mtt.augment import DEFAULT_STRATEGY, DSAParams, apply_params, parse_strategy, sample_params
from mtt.buffers import BufferMeta, ExpertBuffers, finished_experts, flatten_params, write_index, write_shard
from mtt.data import Dataset
from mtt.device import DeviceLike, resolve_device, seconds
from mtt.distributed import ranks
from mtt.interrupt import Interrupted, graceful_stop
from mtt.io import atomic_write_json, ensure_writable_dir, remove_stale_temporaries
from mtt.networks import get_network


@dataclass
class ExpertConfig:
    """How experts are trained; defaults are the paper's (lr = lr_teacher)."""

    model: str = "ConvNet"
    num_experts: int = 10
    epochs: int = 50
    lr: float = 0.01
    batch_size: int = 256
    momentum: float = 0.0
    weight_decay: float = 0.0
    dsa: str = DEFAULT_STRATEGY  # or "none"
    parallel: int = 1  # experts trained at once with vmap on one device
    seed: int = 0  # expert k uses seed + k
    width: int = 128
    depth: int = 3

    def __post_init__(self) -> None:
        for name in ("num_experts", "epochs", "batch_size", "parallel", "width", "depth"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0 (the paper's experts use 0.01), got {self.lr!r}")
        for name in ("momentum", "weight_decay"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        parse_strategy(self.dsa)  # a bad strategy fails before any training


# ----------------------------------------------------------------------------- one expert's randomness

def init_expert(dataset: Dataset, config: ExpertConfig, expert_id: int) -> tuple[nn.Module, torch.Generator]:
    """Expert `expert_id`'s initial network (on the CPU) and the generator of its data order and DSA.

    Both come from one stream seeded by seed + expert_id, forked so the caller's global RNG
    is left alone; the data generator's seed is the stream's next draw, so it is not the
    same sequence that drew the weights.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed + expert_id)
        net = get_network(config.model, dataset.channels, dataset.num_classes, dataset.im_size,
                          width=config.width, depth=config.depth)
        data_seed = int(torch.randint(2**62, ()))
    return net, torch.Generator().manual_seed(data_seed)


def augment(x: Tensor, params: Sequence[DSAParams]) -> Tensor:
    """Apply expert p's DSA draw to its batch x[p]; x is [P, B, C, H, W], params are on the CPU.

    Each draw picks one op, so experts are grouped by op; within a group the per-sample
    tensors are stacked along a new expert dim (one host-to-device copy each) and
    apply_params is vmapped over it.
    """
    out = x.clone()
    for op in dict.fromkeys(p.op for p in params if p.op != "none"):
        members = [i for i, p in enumerate(params) if p.op == op]
        if len(members) == 1:  # nothing to batch (always so on the sequential path)
            out[members[0]] = apply_params(x[members[0]], params[members[0]].to(x.device))
            continue
        template = params[members[0]]
        names = [n for n, v in vars(template).items() if isinstance(v, Tensor)]
        stacked = {n: torch.stack([getattr(params[i], n) for i in members]).to(x.device) for n in names}
        rows = torch.tensor(members, device=x.device)
        out[rows] = vmap(lambda xi, t: apply_params(xi, replace(template, **t)))(x[rows], stacked)
    return out


# ----------------------------------------------------------------------------- trainers

class SequentialExperts:
    """One network, a standard nn.Module loop with torch.optim.SGD: the reference path."""

    def __init__(self, net: nn.Module, config: ExpertConfig) -> None:
        self.net = net
        self.opt = torch.optim.SGD(net.parameters(), lr=config.lr, momentum=config.momentum,
                                   weight_decay=config.weight_decay)

    def step(self, x: Tensor, y: Tensor) -> None:
        """One SGD step on x [1, B, C, H, W], y [1, B]."""
        self.net.train()
        self.opt.zero_grad(set_to_none=True)
        F.cross_entropy(self.net(x[0]), y[0]).backward()
        self.opt.step()

    @torch.no_grad()
    def accuracy(self, images: Tensor, labels: Tensor, batch_size: int) -> Tensor:
        """Test accuracy in [0, 1], shaped [1]."""
        self.net.eval()
        correct = sum((self.net(images[i:i + batch_size]).argmax(1) == labels[i:i + batch_size]).sum()
                      for i in range(0, len(images), batch_size))
        return (correct / len(images)).view(1).float()

    def flat(self) -> Tensor:
        """Parameters as [1, num_params]."""
        return flatten_params(self.net).detach().unsqueeze(0)


class VectorisedExperts:
    """P networks of one architecture as stacked tensors; each step updates all P with vmap.

    SGD is written out on the stacked tensors with torch.optim.SGD's exact update
    (weight decay added to the gradient, momentum buffer starts as the first gradient,
    no dampening), so one step here equals P steps of SequentialExperts.
    """

    def __init__(self, nets: Sequence[nn.Module], config: ExpertConfig) -> None:
        params, buffers = stack_module_state(list(nets))
        self.params = {k: v.detach() for k, v in params.items()}
        self.buffers = buffers
        self.lr, self.momentum, self.weight_decay = config.lr, config.momentum, config.weight_decay
        self.momentum_buffers: dict[str, Tensor] = {}
        base = copy.deepcopy(nets[0]).to("meta")  # only its structure is used, by functional_call

        def loss(params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
            return F.cross_entropy(functional_call(base, (params, buffers), (x,)), y)

        def logits(params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor) -> Tensor:
            return functional_call(base, (params, buffers), (x,))

        self._grads = vmap(grad(loss))
        self._logits = vmap(logits, in_dims=(0, 0, None))  # every expert sees the same test batch

    @torch.no_grad()
    def step(self, x: Tensor, y: Tensor) -> None:
        """One SGD step for every expert p on its own batch x[p] [B, C, H, W], y[p] [B]."""
        grads = self._grads(self.params, self.buffers, x, y)
        for name, p in self.params.items():
            d = grads[name]
            if self.weight_decay:
                d = d.add(p, alpha=self.weight_decay)
            if self.momentum:
                buf = self.momentum_buffers.get(name)
                d = self.momentum_buffers[name] = d.clone() if buf is None else buf.mul_(self.momentum).add_(d)
            p.add_(d, alpha=-self.lr)

    @torch.no_grad()
    def accuracy(self, images: Tensor, labels: Tensor, batch_size: int) -> Tensor:
        """Test accuracy in [0, 1] of every expert, shaped [P]."""
        correct = sum((self._logits(self.params, self.buffers, images[i:i + batch_size]).argmax(-1)
                       == labels[i:i + batch_size]).sum(-1) for i in range(0, len(images), batch_size))
        return (correct / len(images)).float()

    def flat(self) -> Tensor:
        """Parameters as [P, num_params], in named_parameters order like flatten_params."""
        return torch.cat([p.reshape(p.shape[0], -1) for p in self.params.values()], 1)


def has_batchnorm(net: nn.Module) -> bool:
    """BatchNorm keeps running statistics in buffers, which a vmapped step cannot update."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())


# ----------------------------------------------------------------------------- one group of experts

def train_group(dataset: Dataset, config: ExpertConfig, expert_ids: Sequence[int], device: torch.device,
                bar: tqdm | None = None) -> tuple[Tensor, Tensor]:
    """Train the given experts together; returns trajectories [K, epochs+1, P] and test acc [K, epochs] (CPU)."""
    nets, gens = zip(*(init_expert(dataset, config, k) for k in expert_ids))
    nets = [net.to(device) for net in nets]
    trainer = VectorisedExperts(nets, config) if len(nets) > 1 else SequentialExperts(nets[0], config)
    train_x, train_y = dataset.train_images.to(device), dataset.train_labels.to(device)
    test_x, test_y = dataset.test_images.to(device), dataset.test_labels.to(device)
    n, shape = len(train_x), (dataset.channels, dataset.im_size)
    snapshots, accuracies = [trainer.flat().cpu()], []
    for _ in range(config.epochs):
        order = torch.stack([torch.randperm(n, generator=g) for g in gens]).to(device)  # [K, N]
        for start in range(0, n, config.batch_size):
            idx = order[:, start:start + config.batch_size]
            params = [sample_params(config.dsa, idx.shape[1], *shape, g) for g in gens]
            trainer.step(augment(train_x[idx], params), train_y[idx])
        accuracies.append(trainer.accuracy(test_x, test_y, 2 * config.batch_size).cpu())
        snapshots.append(trainer.flat().cpu())
        if bar is not None:
            bar.update(len(nets))
            bar.set_postfix(test_acc=f"{accuracies[-1].mean().item():.3f}")
    return torch.stack(snapshots, 1), torch.stack(accuracies, 1)


# ----------------------------------------------------------------------------- many experts, many ranks

def shard_name(expert_ids: Sequence[int]) -> str:
    return f"experts_{expert_ids[0]:05d}-{expert_ids[-1]:05d}.safetensors"


def train_experts(dataset: Dataset, config: ExpertConfig, out_dir: str | os.PathLike, device: DeviceLike = "auto",
                  expert_ids: Sequence[int] | None = None, progress: bool = True) -> dict[str, Any]:
    """Train the experts not yet finished in out_dir, one shard per group of `parallel`, then index them.

    expert_ids defaults to range(num_experts). Under torchrun, expert k trains on rank
    k % WORLD_SIZE, every rank writes its own shards and rank 0 writes the index once all
    are done. Returns {experts, trained, epochs, params, test_acc (final, per expert in
    expert_ids order; this rank's own only on ranks > 0), seconds, out}.
    """
    start = time.perf_counter()
    out_dir = Path(out_dir)
    ids = list(range(config.num_experts) if expert_ids is None else expert_ids)
    with ranks(resolve_device(device)) as procs:
        rank, world, device = procs.rank, procs.world, procs.device
        if rank == 0:  # before any rank writes: the folder is usable, and holds no debris of a killed run
            ensure_writable_dir(out_dir)
            remove_stale_temporaries(out_dir)
            atomic_write_json(out_dir / "config.json", {"dataset": dataset.name, "zca": dataset.zca is not None,
                                                        "train_images": len(dataset.train_images), **asdict(config)})
        probe, _ = init_expert(dataset, config, 0)
        meta = BufferMeta.for_network(probe, dataset=dataset.name, model=config.model, channels=dataset.channels,
                                      im_size=dataset.im_size, num_classes=dataset.num_classes,
                                      zca=dataset.zca is not None, lr=config.lr, epochs=config.epochs)
        done = finished_experts(out_dir)
        if done:
            _check_compatible(out_dir, meta)
        todo = [k for k in ids if k not in done]
        procs.barrier()  # every rank has read the folder before any rank adds to it
        mine = [k for k in todo if k % world == rank]
        parallel = config.parallel
        if parallel > 1 and has_batchnorm(probe):
            warnings.warn(f"{config.model} has BatchNorm, whose running stats cannot be vmapped: "
                          "training its experts sequentially (parallel=1)", stacklevel=2)
            parallel = 1
        bar = tqdm(total=len(mine) * config.epochs, unit="epoch", file=sys.stderr,
                   desc="experts" if world == 1 else f"experts (rank 0 of {world})",
                   disable=not progress or rank != 0 or not mine)
        final: dict[int, float] = {}
        with graceful_stop() as stop:
            for i in range(0, len(mine), parallel):
                group = mine[i:i + parallel]
                try:
                    with stop.abandonable():  # Ctrl-C drops the group in training; finished shards stay
                        trajectories, test_acc = train_group(dataset, config, group, device, bar)
                except KeyboardInterrupt:
                    _interrupted(out_dir, len(done) + len(final), len(ids), world)
                # One shard per group as soon as it is done: a crash loses at most this group.
                write_shard(out_dir / shard_name(group), trajectories, meta, group, test_acc)
                final.update(zip(group, test_acc[:, -1].tolist()))
                if stop.requested:
                    _interrupted(out_dir, len(done) + len(final), len(ids), world)
        bar.close()
        procs.barrier()
        if rank == 0:
            write_index(out_dir)
            buffers = ExpertBuffers.open(out_dir)
            position = {k: i for i, k in enumerate(buffers.expert_ids)}
            final = {k: float(buffers.test_acc(position[k])[-1]) for k in ids}
    return {"experts": len(ids), "trained": len(todo), "epochs": config.epochs, "params": meta.num_params,
            "test_acc": [final[k] for k in ids if k in final], "seconds": time.perf_counter() - start,
            "out": str(out_dir)}


def _interrupted(out_dir: Path, finished: int, wanted: int, world: int) -> None:
    if world == 1 and finished:
        write_index(out_dir)  # the finished experts are usable as they are
    raise Interrupted(f"interrupted: {finished} of {wanted} experts are finished and kept in {out_dir}; run the "
                      "same command again to train the rest") from None


def _check_compatible(out_dir: Path, meta: BufferMeta) -> None:
    """Refuse to resume into a folder whose experts were trained on something else."""
    # One shard's meta is enough (they must all agree); the index may be stale after a crash.
    first = next(p for p in sorted(out_dir.glob("*.safetensors")) if not p.name.startswith("."))
    existing = ExpertBuffers.open(first).meta
    keys = ("dataset", "model", "channels", "im_size", "num_classes", "zca", "lr", "epochs", "param_shapes")
    diff = {k: (getattr(existing, k), getattr(meta, k)) for k in keys if getattr(existing, k) != getattr(meta, k)}
    if diff:
        detail = ", ".join(f"{k}: {old!r} there vs {new!r} now" for k, (old, new) in diff.items())
        raise ValueError(f"{out_dir} holds experts trained differently ({detail}); use another --out to start afresh")


# ----------------------------------------------------------------------------- how long it will take

def estimate_seconds(dataset: Dataset, config: ExpertConfig, device: DeviceLike = "auto",
                     probe_batches: int = 3) -> float:
    """Rough wall time (seconds) that train_experts(dataset, config) would take on one device.

    Times `probe_batches` SGD steps (after one warm-up step) of one group of `parallel`
    experts, with DSA, and one test batch, then extrapolates to ceil(num_experts / parallel)
    groups x epochs x ceil(n_train / batch_size) steps plus each epoch's test pass. Under
    torchrun divide by the number of ranks. A guide, not a promise: the first steps may run
    slower or faster than the steady state.
    """
    if probe_batches < 1:
        raise ValueError(f"probe_batches must be >= 1, got {probe_batches}")
    device = resolve_device(device)
    probe, _ = init_expert(dataset, config, 0)
    parallel = max(1, min(config.parallel, config.num_experts))
    if parallel > 1 and has_batchnorm(probe):
        parallel = 1  # as train_experts does
    nets, gens = zip(*(init_expert(dataset, config, k) for k in range(parallel)))
    nets = [net.to(device) for net in nets]
    trainer = VectorisedExperts(nets, config) if len(nets) > 1 else SequentialExperts(nets[0], config)
    n, n_test = len(dataset.train_images), len(dataset.test_images)
    batch, test_batch = min(config.batch_size, n), min(2 * config.batch_size, n_test)
    train_x, train_y = dataset.train_images.to(device), dataset.train_labels.to(device)
    test_x, test_y = dataset.test_images[:test_batch].to(device), dataset.test_labels[:test_batch].to(device)
    shape = (dataset.channels, dataset.im_size)

    def timed(fn, repeats: int) -> float:
        fn()  # warm-up: allocations, kernel selection
        return seconds(lambda: [fn() for _ in range(repeats)], device) / repeats

    def train_step() -> None:
        idx = torch.stack([torch.randint(n, (batch,), generator=g) for g in gens]).to(device)
        params = [sample_params(config.dsa, batch, *shape, g) for g in gens]
        trainer.step(augment(train_x[idx], params), train_y[idx])

    step_seconds = timed(train_step, probe_batches)
    test_seconds = timed(lambda: trainer.accuracy(test_x, test_y, test_batch), 1)
    epoch_seconds = math.ceil(n / config.batch_size) * step_seconds + math.ceil(n_test / test_batch) * test_seconds
    return math.ceil(config.num_experts / parallel) * config.epochs * epoch_seconds
