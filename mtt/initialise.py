"""Where the synthetic set starts, and labels read off the experts (DATM, TESLA).

MTT starts from random real images of each class with hard labels. Its successors ask the
experts, at their final epoch, what they make of the images:

- DATM (Guo et al., ICLR 2024) initialises from real images that an expert classifies
  correctly (`correctly_classified_images`), and its learnable soft labels from the mean
  logits of exactly those experts that classify each synthetic image correctly
  (`experts_label_logits`).
- TESLA (Cui et al., ICML 2023) trains the student on the softmax of the *target*
  checkpoint's logits on the current images, recomputed every iteration and never learned
  (`teacher_logits`).

Every expert here is read at its final epoch, as DATM's `Label_Model_Timestamp = -1`.
"""
from __future__ import annotations

import warnings

import torch
from torch import Tensor

from mtt.buffers import ExpertBuffers
from mtt.data import Dataset
from mtt.unroll import Student

CHUNK = 512  # images per forward pass when reading experts' logits: bounded memory at any dataset size


@torch.no_grad()
def logits_at(student: Student, theta: Tensor, images: Tensor) -> Tensor:
    """The network at theta [P] on images [N, ...], in chunks: logits [N, C]."""
    return torch.cat([student(theta, images[i:i + CHUNK]) for i in range(0, len(images), CHUNK)])


@torch.no_grad()
def teacher_logits(student: Student, theta_target: Tensor, images: Tensor) -> Tensor:
    """TESLA's labels: the target checkpoint's logits on the images, [N, C]; [K, N, C] for K targets [K, P]."""
    if theta_target.dim() == 1:
        return logits_at(student, theta_target, images)
    return torch.stack([logits_at(student, theta, images) for theta in theta_target])


def final_parameters(buffers: ExpertBuffers, device: torch.device) -> list[Tensor]:
    return [buffers.snapshot(e, buffers.meta.epochs).to(device) for e in range(len(buffers))]


def correctly_classified_images(dataset: Dataset, ipc: int, student: Student, buffers: ExpertBuffers,
                                generator: torch.Generator, device: torch.device) -> Tensor:
    """DATM's initialisation: per class, `ipc` real images (in a random order) that expert 0 classifies
    correctly; where it gets fewer right, the next experts' correct ones fill up, in turn.

    A class that no expert gets `ipc` images of right is filled with the remaining candidates (with a
    warning): the experts have not learned it, and DATM's loop would never end there.
    """
    dataset.check_ipc(ipc)
    experts = final_parameters(buffers, device)
    chosen = []
    for c in range(dataset.num_classes):
        indices = dataset.class_indices(c)
        candidates = dataset.train_images[indices[torch.randperm(len(indices), generator=generator)]].to(device)
        taken = torch.zeros(len(candidates), dtype=torch.bool, device=device)
        for theta in experts:
            correct = (logits_at(student, theta, candidates).argmax(1) == c) & ~taken
            room = ipc - int(taken.sum())
            taken |= correct & (correct.cumsum(0) <= room)
            if taken.sum() == ipc:
                break
        if taken.sum() < ipc:
            warnings.warn(f"class {c}: the experts classify only {int(taken.sum())} training images correctly, "
                          f"fewer than ipc={ipc}; the rest start from images they get wrong", stacklevel=2)
            taken |= (~taken).cumsum(0) <= ipc - int(taken.sum())
        chosen.append(candidates[taken])
    return torch.cat(chosen)


@torch.no_grad()
def first_expert_label_logits(student: Student, buffers: ExpertBuffers, images: Tensor) -> Tensor:
    """DATM's soft-label initialisation for images drawn at random (its CIFAR-100 IPC 50 config: pix_init real):
    the logits [N, C] of one expert at its final epoch (its buffer[0][-1]; here the first expert)."""
    return logits_at(student, buffers.snapshot(0, -1).to(images.device), images)


def experts_label_logits(student: Student, buffers: ExpertBuffers, images: Tensor, labels: Tensor) -> Tensor:
    """DATM's soft-label initialisation: per image, the mean logits [N, C] of the experts (final epoch) that
    classify it correctly. An image that no expert gets right takes the mean over all of them."""
    logits = torch.stack([logits_at(student, theta, images) for theta in final_parameters(buffers, images.device)])
    correct = (logits.argmax(-1) == labels).unsqueeze(-1)                  # [E, N, 1]
    count = correct.sum(0)                                                 # [N, 1]
    mean_correct = (logits * correct).sum(0) / count.clamp(min=1)
    return torch.where(count > 0, mean_correct, logits.mean(0))
