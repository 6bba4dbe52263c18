"""Expert trajectories: train many networks on real data and keep every epoch's parameters.

Paper protocol (MTT, section 3): each expert starts from a fresh random initialisation and
trains `epochs` epochs with plain SGD (lr_teacher 0.01, batch 256, no momentum, no weight
decay, no lr decay) with DSA on the real training set (ZCA space when ZCA is on). We keep
epochs+1 snapshots (0 = initialisation) and the test accuracy after every epoch.

Two paths, the same experts up to float32 round-off (batched kernels add in another order: ~5e-7 apart, not bit
for bit). Sequential (P=1) is a plain nn.Module loop with torch.optim.SGD and is the reference. Vectorised (P>1)
stacks P networks with torch.func.stack_module_state and takes each SGD step for all of them at once with
vmap(grad(functional_call)). Expert k draws its initialisation, data order and DSA parameters from its own stream
(mtt.seeds.stream: seed * 2**16 + k), so it follows the same batches whatever P, rank or world size it trains
under, and two seeds never share an expert.

Two options for MTT's successors, both off by default:
- FTD's flat experts (sam_rho, gsam_alpha): each step goes along GSAM's direction, from a
  second gradient at sharpness-perturbed weights (gsam_direction).
- PAD's easy-to-hard data (easy_to_hard, easy_to_hard_epochs, drop_easy): images are ranked
  by EL2N (el2n_scores, cached in the output folder) and each epoch uses only the easiest share
  of every class, a share that grows linearly to the whole set, and in later stages leaves out
  the easiest images again (admitted_images).
"""
from __future__ import annotations

import copy
import json
import math
import os
import sys
import time
import warnings
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from torch import Tensor
from torch.func import functional_call, grad, stack_module_state, vmap
from tqdm.auto import tqdm

from mtt.augment import DEFAULT_STRATEGY, DSAParams, apply_params, parse_strategy, sample_params
from mtt.buffers import (EXPERTS_CONFIG, BufferMeta, ExpertBuffers, finished_experts, flatten_params, shard_paths,
                         write_index, write_shard)
from mtt.data import Dataset
from mtt.device import DeviceLike, out_of_memory_reason, resolve_device, seconds, to_device
from mtt.distributed import RankWarning, Ranks, ranks
from mtt.interrupt import GracefulStop, Interrupted, graceful_stop
from mtt.io import atomic_save_safetensors, atomic_write_json, held_folder, load_safetensors, read_json
from mtt.networks import fixed_sizes, get_network
from mtt.seeds import STREAMS_PER_SEED, check_seed, stream


# A seed's random streams (mtt.seeds): experts 0 .. SCORER_ID - 1, then PAD's scoring networks.
SCORER_ID = STREAMS_PER_SEED - 16  # scoring network j draws from stream SCORER_ID + j of the seed, which no expert uses


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
    seed: int = 0  # in [0, 2**16): expert k draws from stream seed * 2**16 + k (mtt.seeds)
    width: int = 128
    depth: int = 3
    sam_rho: float = 0.0  # FTD: > 0 trains with adaptive SAM of this radius (FTD: 0.01); 0 = plain SGD
    gsam_alpha: float = 0.0  # FTD: GSAM's surrogate-gap weight (FTD: 0.3 on CIFAR-10); 0 = plain SAM
    easy_to_hard: float = 0.0  # PAD: share of each class's easiest images used in epoch 0 (PAD: 0.75); 0 = off
    easy_to_hard_epochs: int = 20  # PAD's add_end_epoch: the share grows linearly to 1 at this epoch
    # PAD's later stages, (after, share) pairs: in the epochs after `after` every class leaves out its
    # easiest `share` (PAD: ((40, 0.1), (60, 0.2)), its rm_epoch_* and rm_easy_ratio_*); () = off
    drop_easy: tuple[tuple[int, float], ...] = ()

    def __post_init__(self) -> None:
        for name in ("num_experts", "epochs", "batch_size", "parallel", "width", "depth", "easy_to_hard_epochs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not 0 < self.lr < math.inf:
            raise ValueError(f"lr must be > 0 and finite (the paper's experts use 0.01), got {self.lr!r}")
        if not 0 <= self.momentum < 1:  # at 1 or more SGD's velocity grows without bound
            raise ValueError(f"momentum must be in [0, 1) (the paper's experts use 0), got {self.momentum!r}")
        check_seed(self.seed)
        if self.num_experts > SCORER_ID:
            raise ValueError(f"num_experts must be at most {SCORER_ID} (each seed has {SCORER_ID} experts' random "
                             f"streams), got {self.num_experts}")
        for name in ("weight_decay", "sam_rho", "gsam_alpha"):
            if not 0 <= getattr(self, name) < math.inf:
                raise ValueError(f"{name} must be >= 0 and finite, got {getattr(self, name)!r}")
        if self.gsam_alpha and not self.sam_rho:
            raise ValueError(f"gsam_alpha={self.gsam_alpha} weighs GSAM's correction of SAM, which is off: set "
                             "sam_rho (--sam-rho) too, e.g. 0.01 as FTD does")
        if not 0 <= self.easy_to_hard <= 1:
            raise ValueError(f"easy_to_hard must be a fraction in [0, 1] (0 = off; PAD uses 0.75), "
                             f"got {self.easy_to_hard!r}")
        self.drop_easy = _drop_easy_stages(self.drop_easy)
        parse_strategy(self.dsa)  # a bad strategy fails before any training

    @property
    def curriculum(self) -> bool:
        """Whether the images are ranked by difficulty (EL2N) and admitted epoch by epoch (PAD)."""
        return bool(self.easy_to_hard or self.drop_easy)


def _drop_easy_stages(stages: Any) -> tuple[tuple[int, float], ...]:
    """drop_easy as a tuple of (after, share) tuples (JSON gives lists), or a ValueError saying what is wrong."""
    def is_number(x: Any) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool)

    try:
        pairs = tuple((after, share) for after, share in stages)
    except (TypeError, ValueError):
        pairs = None
    valid = pairs is not None and all(is_number(a) and a == int(a) >= 0 and is_number(s) and 0 <= s < 1
                                      for a, s in pairs)
    if not valid or [a for a, _ in pairs] != sorted({a for a, _ in pairs}):
        raise ValueError(f"drop_easy must be (after epoch >= 0, share in [0, 1)) pairs in increasing epoch order, "
                         f"e.g. ((40, 0.1), (60, 0.2)) as PAD; got {stages!r}")
    return tuple((int(after), float(share)) for after, share in pairs)


# ----------------------------------------------------------------------------- one expert's randomness

def init_expert(dataset: Dataset, config: ExpertConfig, expert_id: int) -> tuple[nn.Module, torch.Generator]:
    """Expert `expert_id`'s initial network (on the CPU) and the generator of its data order and DSA.

    Both come from one stream (mtt.seeds.stream), forked so the caller's global RNG is left alone;
    the data generator's seed is the stream's next draw, so it is not the same sequence that
    drew the weights.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(stream(config.seed, expert_id))
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
        stacked = {n: to_device(torch.stack([getattr(params[i], n) for i in members]), x.device) for n in names}
        rows = to_device(torch.tensor(members), x.device)
        out[rows] = vmap(lambda xi, t: apply_params(xi, replace(template, **t)))(x[rows], stacked)
    return out


# ----------------------------------------------------------------------------- sharpness-aware direction (FTD)

Params = dict[str, Tensor]  # parameter name -> tensor with a leading expert dim [K, ...]

# GSAM's perturb_eps, used in both the perturbation and the decomposition (juntang-zhuang/GSAM, gsam/gsam.py).
GSAM_EPS = 1e-12


def _per_expert(value: Tensor, like: Tensor) -> Tensor:
    """A per-expert scalar [K] shaped to broadcast against `like` [K, ...]."""
    return value.view(-1, *[1] * (like.dim() - 1))


def _dot(a: Params, b: Params) -> Tensor:
    """<a, b> of each expert over all its parameters: [K]."""
    return sum((a[name] * b[name]).flatten(1).sum(1) for name in a)


def _norm(a: Params) -> Tensor:
    return _dot(a, a).sqrt()


def gsam_direction(weights: Params, grads: Params, grads_at: Callable[[Params], Params], rho: float,
                   alpha: float) -> Params:
    """GSAM's update direction (Zhuang et al., ICLR 2022) with adaptive=True, as FTD trains its experts.

    `grads` is the gradient g at `weights` w, grads_at(w') the gradient on the same batch at
    other weights. As GSAM.perturb_weights and GSAM.gradient_decompose in
    juntang-zhuang/GSAM (gsam/gsam.py, the `gsam` package that FTD's and PAD's buffer scripts
    import), eps = 1e-12 (perturb_eps), norms over all of an expert's parameters:
      e = rho * w^2 * g / (|| |w| * g || + eps)           (adaptive: the norm weighs g by |w|)
      g_p = grad L(w + e)
      cosine = <g, g_p> / (||g|| ||g_p|| + eps)          (plain norms here)
      vertical = g - cosine * ||g|| * g_p / (||g_p|| + eps)
      direction = g_p - alpha * vertical                  (alpha = 0: plain adaptive SAM)
    The caller's SGD step then uses the direction at w, with its weight decay and momentum.
    """
    scale = rho / (_norm({name: w.abs() * grads[name] for name, w in weights.items()}) + GSAM_EPS)
    g_p = grads_at({name: w + grads[name] * _per_expert(scale, w) * w.square() for name, w in weights.items()})
    g_norm, g_p_norm = _norm(grads), _norm(g_p)
    cosine = _dot(grads, g_p) / (g_norm * g_p_norm + GSAM_EPS)
    ratio = cosine * g_norm / (g_p_norm + GSAM_EPS)
    return {name: g_p[name] - alpha * (g - _per_expert(ratio, g) * g_p[name]) for name, g in grads.items()}


@contextmanager
def running_stats_frozen(net: nn.Module) -> Iterator[None]:
    """BatchNorm keeps its running statistics through the perturbed pass (GSAM's disable_running_stats)."""
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch
    try:
        yield
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum


# ----------------------------------------------------------------------------- trainers

class SequentialExperts:
    """One network, a standard nn.Module loop with torch.optim.SGD: the reference path."""

    def __init__(self, net: nn.Module, config: ExpertConfig) -> None:
        self.net = net
        self.opt = torch.optim.SGD(net.parameters(), lr=config.lr, momentum=config.momentum,
                                   weight_decay=config.weight_decay)
        self.sam_rho, self.gsam_alpha = config.sam_rho, config.gsam_alpha

    def step(self, x: Tensor, y: Tensor) -> None:
        """One SGD step on x [1, B, C, H, W], y [1, B]; along GSAM's direction when sam_rho is set."""
        self.net.train()
        self.opt.zero_grad(set_to_none=True)
        F.cross_entropy(self.net(x[0]), y[0]).backward()
        if self.sam_rho:
            self._gsam_grads(x[0], y[0])
        self.opt.step()

    def _gsam_grads(self, x: Tensor, y: Tensor) -> None:
        """Replace every .grad by GSAM's direction (a leading expert dim of 1 for gsam_direction)."""
        params = dict(self.net.named_parameters())

        def grads_at(weights: Params) -> Params:
            leaves = {name: w[0].detach().requires_grad_() for name, w in weights.items()}
            with torch.enable_grad(), running_stats_frozen(self.net):
                loss = F.cross_entropy(functional_call(self.net, leaves, (x,)), y)
                grads = torch.autograd.grad(loss, list(leaves.values()))
            return {name: g.unsqueeze(0) for name, g in zip(leaves, grads)}

        with torch.no_grad():
            direction = gsam_direction({name: p.detach().unsqueeze(0) for name, p in params.items()},
                                       {name: p.grad.unsqueeze(0) for name, p in params.items()},
                                       grads_at, self.sam_rho, self.gsam_alpha)
        for name, p in params.items():
            p.grad = direction[name][0]

    @torch.no_grad()
    def logits(self, images: Tensor) -> Tensor:
        """Eval-mode logits [1, N, classes]."""
        self.net.eval()
        return self.net(images).unsqueeze(0)

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
        self.sam_rho, self.gsam_alpha = config.sam_rho, config.gsam_alpha
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
        if self.sam_rho:
            grads = gsam_direction(self.params, grads, lambda weights: self._grads(weights, self.buffers, x, y),
                                   self.sam_rho, self.gsam_alpha)
        for name, p in self.params.items():
            d = grads[name]
            if self.weight_decay:
                d = d.add(p, alpha=self.weight_decay)
            if self.momentum:
                buf = self.momentum_buffers.get(name)
                d = self.momentum_buffers[name] = d.clone() if buf is None else buf.mul_(self.momentum).add_(d)
            p.add_(d, alpha=-self.lr)

    @torch.no_grad()
    def logits(self, images: Tensor) -> Tensor:
        """Every expert's logits [P, N, classes] on the same images."""
        return self._logits(self.params, self.buffers, images)

    def flat(self) -> Tensor:
        """Parameters as [P, num_params], in named_parameters order like flatten_params."""
        return torch.cat([p.reshape(p.shape[0], -1) for p in self.params.values()], 1)


Trainer = SequentialExperts | VectorisedExperts


def has_batchnorm(net: nn.Module) -> bool:
    """BatchNorm keeps running statistics in buffers, which a vmapped step cannot update."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())


def start_group(dataset: Dataset, config: ExpertConfig, expert_ids: Sequence[int],
                device: torch.device) -> tuple[Trainer, list[torch.Generator]]:
    """The trainer of the given experts at their initialisation, and each one's generator."""
    nets, gens = zip(*(init_expert(dataset, config, k) for k in expert_ids))
    nets = [net.to(device) for net in nets]
    trainer = VectorisedExperts(nets, config) if len(nets) > 1 else SequentialExperts(nets[0], config)
    return trainer, list(gens)


def accuracy(trainer: Trainer, images: Tensor, labels: Tensor, batch_size: int) -> Tensor:
    """Test accuracy in [0, 1] of every expert of the trainer, shaped [P]."""
    correct = sum((trainer.logits(images[i:i + batch_size]).argmax(-1) == labels[i:i + batch_size]).sum(-1)
                  for i in range(0, len(images), batch_size))
    return (correct / len(images)).float()


def train_epoch(trainer: Trainer, gens: Sequence[torch.Generator], images: Tensor, labels: Tensor,
                config: ExpertConfig, admitted: Tensor | None = None) -> None:
    """One epoch of every expert: expert k visits the `admitted` images (default: all) in its own order.

    Each batch gets its own DSA draw from the expert's generator. The order is a permutation
    of positions in `admitted`, so with every image admitted it is the plain run's order.
    """
    n = len(images) if admitted is None else len(admitted)
    order = torch.stack([torch.randperm(n, generator=g) for g in gens])  # [K, n]
    order = to_device(order if admitted is None else admitted[order], images.device)
    shape = (images.shape[1], tuple(images.shape[2:]))
    for start in range(0, n, config.batch_size):
        idx = order[:, start:start + config.batch_size]
        params = [sample_params(config.dsa, idx.shape[1], *shape, g) for g in gens]
        trainer.step(augment(images[idx], params), labels[idx])


# ----------------------------------------------------------------------------- easy-to-hard data (PAD)

EL2N_NETWORKS, EL2N_EPOCHS = 4, 10
SCORES_FILE = Path("curriculum") / "el2n.safetensors"  # in a subfolder: *.safetensors beside it are shards


def el2n(logits: Tensor, labels: Tensor) -> Tensor:
    """EL2N of each sample, || softmax(logits) - onehot(label) ||_2: [..., N] from logits [..., N, classes]."""
    return (logits.float().softmax(-1) - F.one_hot(labels, logits.shape[-1])).norm(dim=-1)


def el2n_scores(dataset: Dataset, config: ExpertConfig, device: DeviceLike = "auto",
                networks: int = EL2N_NETWORKS, epochs: int = EL2N_EPOCHS) -> Tensor:
    """Each training image's difficulty, EL2N (Paul et al., NeurIPS 2021), as a float32 tensor [N] on the CPU.

    `networks` networks are trained exactly like the experts (same config) for `epochs` epochs
    on the whole training set, from their own streams (those of experts SCORER_ID + j), all at once
    with vmap (one at a time with BatchNorm); each image's EL2N on the un-augmented image,
    in eval mode, is averaged over them. Low = easy. Deterministic for a seed on one device.
    Paul et al. score at epoch 20 of 200, averaged over 10 runs; a few short runs keep this
    cheap next to the experts themselves (4 x 10 epochs against 100 x 50).
    """
    for name, value in (("networks", networks), ("epochs", epochs)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    device = resolve_device(device)
    scorer = replace(config, epochs=epochs)
    group = 1 if has_batchnorm(init_expert(dataset, scorer, SCORER_ID)[0]) else networks
    train_x, train_y = dataset.train_images.to(device), dataset.train_labels.to(device)
    total = torch.zeros(len(train_x), dtype=torch.float64)
    for first in range(0, networks, group):
        ids = range(SCORER_ID + first, SCORER_ID + min(first + group, networks))
        trainer, gens = start_group(dataset, scorer, ids, device)
        for _ in range(epochs):
            train_epoch(trainer, gens, train_x, train_y, scorer)
        batch = 2 * scorer.batch_size
        total += torch.cat([el2n(trainer.logits(train_x[i:i + batch]), train_y[i:i + batch]).sum(0).cpu()
                            for i in range(0, len(train_x), batch)]).double()
    return (total / networks).float()


def admitted_images(scores: Tensor, labels: Tensor, config: ExpertConfig, epoch: int) -> Tensor | None:
    """Indices (ascending) of the training images used in `epoch` (0-based); None = all of them.

    PAD's buffer_CL.py (NUS-HPC-AI-Lab/PAD), stage by stage: up to epoch add_end_epoch
    (easy_to_hard_epochs) every class keeps its int(p * n_class) lowest-scored images, p =
    min(1, init_ratio + (1 - init_ratio) * e / add_end_epoch) (utils_cl_scheduler.
    linear_cl_scheduler_acse; init_ratio = easy_to_hard); after that, in the epochs after each
    `after` of drop_easy, every class leaves out its int(share * n_class) lowest-scored images.
    """
    if not config.curriculum:
        return None
    if config.easy_to_hard and epoch <= config.easy_to_hard_epochs:  # adding the harder images
        share = min(1.0, config.easy_to_hard + (1 - config.easy_to_hard) * epoch / config.easy_to_hard_epochs)
        kept_range = (0.0, share)  # of each class's images ranked easiest first
    else:  # removing the easiest again, in PAD's later stages
        dropped = next((share for after, share in reversed(config.drop_easy) if epoch > after), 0.0)
        kept_range = (dropped, 1.0)
    if kept_range == (0.0, 1.0):
        return None
    kept = []
    for c in labels.unique():
        members = (labels == c).nonzero().squeeze(1)
        ranked = members[scores[members].argsort(stable=True)]
        kept.append(ranked[int(kept_range[0] * len(ranked)):int(kept_range[1] * len(ranked))])
    return torch.cat(kept).sort().values


def _scores_key(dataset: Dataset, config: ExpertConfig) -> dict[str, Any]:
    """What the EL2N scores depend on: a cached file is reused only where all of it agrees."""
    keep = ("model", "width", "depth", "lr", "batch_size", "momentum", "weight_decay", "dsa", "seed", "sam_rho",
            "gsam_alpha")
    return {"dataset": dataset.name, "zca": dataset.zca is not None, "train_images": len(dataset.train_images),
            **{k: getattr(config, k) for k in keep}, "networks": EL2N_NETWORKS, "epochs": EL2N_EPOCHS}


def curriculum_scores(dataset: Dataset, config: ExpertConfig, out_dir: Path, procs: Ranks) -> Tensor:
    """The EL2N scores of out_dir's cache, computed and cached by rank 0 first if there are none yet.

    A resumed run reuses them, so its new experts see the same curriculum as the finished ones.
    """
    path, key = out_dir / SCORES_FILE, _scores_key(dataset, config)
    if procs.is_main and not path.exists():
        scores = el2n_scores(dataset, config, procs.device)
        atomic_save_safetensors({"el2n": scores, "labels": dataset.train_labels}, path,
                                metadata={"el2n": json.dumps(key)})
    procs.barrier()
    cached = load_safetensors(path)
    with safe_open(str(path), "pt") as f:
        stored = json.loads((f.metadata() or {}).get("el2n", "{}"))
    diff = {k: (stored.get(k), v) for k, v in key.items() if stored.get(k) != v}
    if diff or not torch.equal(cached["labels"], dataset.train_labels):
        detail = ", ".join(f"{k}: {old!r} there vs {new!r} now" for k, (old, new) in diff.items()) or "other labels"
        raise ValueError(f"{path} holds EL2N scores of other training ({detail}): delete it to score again, or use "
                         "another --out")
    return cached["el2n"]


# ----------------------------------------------------------------------------- one group of experts

def train_group(dataset: Dataset, config: ExpertConfig, expert_ids: Sequence[int], device: torch.device,
                bar: tqdm | None = None, scores: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Train the given experts together; returns trajectories [K, epochs+1, P] and test acc [K, epochs] (CPU).

    With the curriculum on, `scores` (EL2N, [N]) rank the images; computed here if not given.
    """
    if config.curriculum and scores is None:
        scores = el2n_scores(dataset, config, device)
    trainer, gens = start_group(dataset, config, expert_ids, device)
    train_x, train_y = dataset.train_images.to(device), dataset.train_labels.to(device)
    test_x, test_y = dataset.test_images.to(device), dataset.test_labels.to(device)
    snapshots, accuracies = [trainer.flat().cpu()], []
    for epoch in range(config.epochs):
        admitted = None if scores is None else admitted_images(scores, dataset.train_labels, config, epoch)
        train_epoch(trainer, gens, train_x, train_y, config, admitted)
        accuracies.append(accuracy(trainer, test_x, test_y, 2 * config.batch_size).cpu())
        snapshots.append(trainer.flat().cpu())
        if bar is not None:
            bar.update(len(gens))
            bar.set_postfix(test_acc=f"{accuracies[-1].mean().item():.3f}")
    return torch.stack(snapshots, 1), torch.stack(accuracies, 1)


# ----------------------------------------------------------------------------- many experts, many ranks

def shard_name(expert_ids: Sequence[int]) -> str:
    return f"experts_{expert_ids[0]:05d}-{expert_ids[-1]:05d}.safetensors"


def train_experts(dataset: Dataset, config: ExpertConfig, out_dir: str | os.PathLike, device: DeviceLike = "auto",
                  progress: bool = True) -> dict[str, Any]:
    """Train the experts not yet finished in out_dir, one shard per group of `parallel`, then index them.

    Experts 0 .. num_experts - 1. Under torchrun, expert k trains on rank k % WORLD_SIZE,
    every rank writes its own shards and rank 0 writes the index once all are done. Returns
    {experts, trained, epochs, params, test_acc (final, per expert in id order; this rank's
    own only on ranks > 0), seconds, out}.
    """
    start = time.perf_counter()
    out_dir = Path(out_dir)
    ids = list(range(config.num_experts))
    with ranks(resolve_device(device)) as procs, ExitStack() as held:
        rank, world, device = procs.rank, procs.world, procs.device
        if rank == 0:  # before any rank writes: the folder is usable, this job's alone, without a killed run's debris
            held.enter_context(held_folder(out_dir))
        settings = _training_settings(dataset, config)
        probe, _ = init_expert(dataset, config, 0)
        meta = BufferMeta.for_network(probe, dataset=dataset.name, model=config.model, channels=dataset.channels,
                                      im_size=dataset.im_size, num_classes=dataset.num_classes,
                                      zca=dataset.zca is not None, lr=config.lr, epochs=config.epochs)
        done = finished_experts(out_dir)
        if done:
            _check_compatible(out_dir, meta)
            _check_same_training(out_dir, settings)
        todo = [k for k in ids if k not in done]
        kept = sorted(set(done) | set(ids))  # asking for fewer than the folder holds removes none
        procs.barrier()  # every rank has read the folder before any rank adds to it
        if rank == 0:
            atomic_write_json(out_dir / EXPERTS_CONFIG, settings | {"num_experts": len(kept)})
        scores = curriculum_scores(dataset, config, out_dir, procs) if config.curriculum and todo else None
        mine = [k for k in todo if k % world == rank]
        parallel = _parallel_for(probe, config.parallel)
        if parallel < config.parallel:
            warnings.warn(f"{config.model} has BatchNorm, whose running stats cannot be vmapped: "
                          "training its experts sequentially (parallel=1)", stacklevel=2)
        final: dict[int, float] = {}
        # The bar is closed however training ends, so that what is printed then is not written on its line.
        with graceful_stop() as stop, tqdm(total=len(mine) * config.epochs, unit="epoch", file=sys.stderr,
                                           desc="experts" if world == 1 else f"experts (rank 0 of {world})",
                                           disable=not progress or rank != 0 or not mine) as bar:
            pending = list(mine)
            while pending:
                group, pending = pending[:parallel], pending[parallel:]
                epochs_shown, ran_out = bar.n, None
                try:
                    with stop.abandonable():  # Ctrl-C drops the group in training; finished shards stay
                        trajectories, test_acc = train_group(dataset, config, group, device, bar, scores)
                except KeyboardInterrupt:
                    _interrupted(out_dir, len(ids), world, stop)
                except torch.OutOfMemoryError as err:
                    ran_out = out_of_memory_reason(err)
                if ran_out is not None:  # (out of the except: the error's traceback no longer holds the group)
                    parallel = _fewer_at_once(group, device, ran_out)
                    pending = group + pending  # this group again, in smaller ones: the same experts (by id)
                    bar.n = epochs_shown
                    bar.refresh()
                    continue
                _check_finite(trajectories, group, config)
                # One shard per group as soon as it is done: a crash loses at most this group.
                write_shard(out_dir / shard_name(group), trajectories, meta, group, test_acc)
                final.update(zip(group, test_acc[:, -1].tolist()))
                if stop.requested:
                    _interrupted(out_dir, len(ids), world, stop)
        procs.barrier()
        if rank == 0:
            write_index(out_dir)
            buffers = ExpertBuffers.open(out_dir)
            position = {k: i for i, k in enumerate(buffers.expert_ids)}
            if missing := [k for k in ids if k not in position]:
                raise ValueError(f"experts {missing} are no longer in {out_dir} (its files were removed while the "
                                 f"experts trained?): run the command again to train them")
            final = {k: float(buffers.test_acc(position[k])[-1]) for k in ids}
    return {"experts": len(kept), "trained": len(todo), "epochs": config.epochs, "params": meta.num_params,
            "test_acc": [final[k] for k in ids if k in final], "seconds": time.perf_counter() - start,
            "out": str(out_dir)}


def _fewer_at_once(group: Sequence[int], device: torch.device, reason: str) -> int:
    """How many experts to train at once after `group` ran out of memory: half as many, said in a warning (each
    expert follows the same path whatever its group, so nothing changes but the time); none fits alone: an error."""
    if len(group) == 1:
        raise ValueError(f"the device ran out of memory training one expert alone ({reason}): use a smaller "
                         f"--batch-size, a smaller network, or a device with more memory; experts finished before "
                         f"it, if any, are kept")
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the failed group's blocks, for the smaller groups
    fewer = len(group) // 2
    warnings.warn(f"{len(group)} experts at once ran out of memory on {device} ({reason}): training {fewer} at once "
                  f"from here (the same experts, in more time; next time pass --parallel {fewer} or fewer)",
                  RankWarning, stacklevel=3)
    return fewer


def _check_finite(trajectories: Tensor, group: Sequence[int], config: ExpertConfig) -> None:
    """Refuse to save experts whose training diverged: distilling from them fails with a non-finite loss that
    no distillation setting can mend."""
    broken = ~torch.isfinite(trajectories).all(-1)  # [experts, epochs + 1]
    for k, epochs in zip(group, broken.tolist()):
        if any(epochs):
            raise ValueError(f"expert {k} diverged: its parameters are not finite from epoch {epochs.index(True)} "
                             f"on (lr {config.lr:g}, momentum {config.momentum:g}, weight decay "
                             f"{config.weight_decay:g}); lower them (the paper's experts use lr 0.01 and neither). "
                             f"Experts finished before it, if any, are kept")


def _interrupted(out_dir: Path, wanted: int, world: int, stop: GracefulStop) -> None:
    stop.finish()
    finished = len(finished_experts(out_dir) & set(range(wanted)))  # every rank's whose shards are written by now
    if world == 1 and finished:
        write_index(out_dir)  # the finished experts are usable as they are
    raise Interrupted(f"interrupted: {finished} of {wanted} experts are finished and kept in {out_dir}; run the "
                      "same command again to train the rest") from None


FREE_ON_RESUME = ("num_experts", "parallel")  # how many experts, and how many at once: the rest is how each trains


def _training_settings(dataset: Dataset, config: ExpertConfig) -> dict[str, Any]:
    """What config.json records: the data and every setting, as JSON gives them back (tuples as lists)."""
    scoring = {"el2n": {"file": str(SCORES_FILE), "networks": EL2N_NETWORKS, "epochs": EL2N_EPOCHS,
                        "seed": stream(config.seed, SCORER_ID)}} if config.curriculum else {}
    return json.loads(json.dumps({"dataset": dataset.name, "zca": dataset.zca is not None,
                                  "train_images": len(dataset.train_images), **asdict(config), **scoring}))


def _check_same_training(out_dir: Path, settings: dict[str, Any]) -> None:
    """Refuse to add experts trained otherwise than those already in the folder (momentum, batch size, DSA,
    seed, SAM, curriculum, training images ...): one folder, one kind of expert."""
    path = out_dir / EXPERTS_CONFIG
    if not path.is_file():  # shards copied without it: their metadata does not say how they were trained
        raise ValueError(f"{out_dir} holds experts but no {EXPERTS_CONFIG} saying how they were trained (a copy "
                         f"without it), so experts added now could be trained otherwise, or repeat them: train into "
                         f"another --out, or put back the {EXPERTS_CONFIG} of the run that trained them")
    before = read_json(path, f"put back the {EXPERTS_CONFIG} of the run that trained these experts, or train into "
                             "another --out")
    # A size the model's name fixes (ConvNetW32's width) is the shards' to check: mtt 0.1 recorded the default here.
    unchecked = (*FREE_ON_RESUME, *fixed_sizes(settings["model"]))
    diff = {k: (before[k], v) for k, v in settings.items() if k in before and k not in unchecked and before[k] != v}
    if diff:
        detail = ", ".join(f"{k}: {old!r} there vs {new!r} now" for k, (old, new) in diff.items())
        raise ValueError(f"{out_dir} holds experts trained with other settings ({detail}); run with the settings "
                         f"its {EXPERTS_CONFIG} records to add to them, or use another --out to start afresh")


def _parallel_for(probe: nn.Module, parallel: int) -> int:
    """The experts trained at once: `parallel`, or one at a time for a network with BatchNorm, whose running stats
    cannot be vmapped."""
    return 1 if parallel > 1 and has_batchnorm(probe) else parallel


def _check_compatible(out_dir: Path, meta: BufferMeta) -> None:
    """Refuse to resume into a folder whose experts were trained on something else."""
    # One shard's meta is enough (they must all agree); the index may be stale after a crash.
    existing = ExpertBuffers.open(shard_paths(out_dir)[0]).meta
    keys = ("dataset", "model", "channels", "im_size", "num_classes", "zca", "lr", "epochs", "param_shapes")
    diff = {k: (getattr(existing, k), getattr(meta, k)) for k in keys if getattr(existing, k) != getattr(meta, k)}
    sizes = existing.convnet_size(), meta.convnet_size()
    if "param_shapes" in diff and None not in sizes:  # a ConvNet's shapes say no more than its width and depth
        diff.pop("param_shapes")
        diff |= {name: (old, new) for name, old, new in zip(("width", "depth"), *sizes) if old != new}
    if diff:
        detail = ", ".join(f"{k}: {old!r} there vs {new!r} now" for k, (old, new) in diff.items())
        raise ValueError(f"{out_dir} holds experts trained differently ({detail}); use another --out to start afresh")


# ----------------------------------------------------------------------------- how long it will take

def estimate_seconds(dataset: Dataset, config: ExpertConfig, device: DeviceLike = "auto",
                     probe_batches: int = 3) -> float:
    """Rough wall time (seconds) that train_experts(dataset, config) would take on one device.

    Times `probe_batches` SGD steps (after one warm-up step) of one group of `parallel`
    experts, with DSA (and GSAM's second pass if on), and one test batch, then extrapolates
    to ceil(num_experts / parallel) groups x epochs x ceil(images / batch_size) steps plus
    each epoch's test pass, where images is what PAD's curriculum admits that
    epoch (all, without it), plus the EL2N scoring networks' epochs, timed as a group's. Under
    torchrun divide by the number of ranks. A guide, not a promise: the first steps may run
    slower or faster than the steady state.
    """
    if probe_batches < 1:
        raise ValueError(f"probe_batches must be >= 1, got {probe_batches}")
    device = resolve_device(device)
    probe, _ = init_expert(dataset, config, 0)
    parallel = _parallel_for(probe, max(1, min(config.parallel, config.num_experts)))
    trainer, gens = start_group(dataset, config, range(parallel), device)
    n, n_test = len(dataset.train_images), len(dataset.test_images)
    batch, test_batch = min(config.batch_size, n), min(2 * config.batch_size, n_test)
    train_x, train_y = dataset.train_images.to(device), dataset.train_labels.to(device)
    test_x, test_y = dataset.test_images[:test_batch].to(device), dataset.test_labels[:test_batch].to(device)
    shape = (dataset.channels, dataset.im_size)

    def timed(fn, repeats: int) -> float:
        fn()  # warm-up: allocations, kernel selection
        return seconds(lambda: [fn() for _ in range(repeats)], device) / repeats

    def train_step() -> None:
        idx = to_device(torch.stack([torch.randint(n, (batch,), generator=g) for g in gens]), device)  # as train_epoch
        params = [sample_params(config.dsa, batch, *shape, g) for g in gens]
        trainer.step(augment(train_x[idx], params), train_y[idx])

    def images_in(epoch: int) -> int:  # how many are admitted depends on the share only, not on the scores
        admitted = admitted_images(torch.zeros(n), dataset.train_labels, config, epoch)
        return n if admitted is None else len(admitted)

    step_seconds = timed(train_step, probe_batches)
    test_seconds = timed(lambda: accuracy(trainer, test_x, test_y, test_batch), 1)
    steps = sum(math.ceil(images_in(e) / config.batch_size) for e in range(config.epochs))
    group_seconds = steps * step_seconds + config.epochs * math.ceil(n_test / test_batch) * test_seconds
    scoring_seconds = EL2N_EPOCHS * math.ceil(n / config.batch_size) * step_seconds if config.curriculum else 0.0
    return math.ceil(config.num_experts / parallel) * group_seconds + scoring_seconds
