"""The training loop: the paper's recipe with validation, best/last checkpoints and resume.

Every epoch reseeds its random generators from ``(seed, epoch)``, so a run resumed
from its last checkpoint (saved at the end of each epoch with the optimizer state)
continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unetflow.config import ModelSpec, TrainSpec
from unetflow.errors import ConfigError, InputNotFoundError
from unetflow.geometry import Box
from unetflow.infer import predict_array
from unetflow.model.predictor import Predictor, pick_device
from unetflow.model.checkpoint import load_checkpoint, save_checkpoint
from unetflow.model.unet import UNet
from unetflow.plan import make_tiling
from unetflow.train.data import INSTANCE_CLASSES, PatchSpec, Pair, detect_targets, open_pairs, prepare_targets, read_region, sample_patch
from unetflow.train.losses import soft_dice_loss, weighted_cross_entropy

log = logging.getLogger(__name__)

DEFAULT_TRAIN_PATCH = {2: 128, 3: 48}
MAX_VAL_EDGE = {2: 512, 3: 96}


@dataclass
class TrainReport:
    """What a training run leaves: per-epoch history and where the checkpoints are."""

    best: str
    last: str
    history: list[dict[str, float]] = field(default_factory=list)
    best_score: float = -1.0


def last_path(output: str) -> str:
    p = Path(output)
    return str(p.with_name(p.stem + ".last" + (p.suffix or ".pt")))


def train(spec: TrainSpec, *, progress: bool = True) -> TrainReport:
    """Train a U-Net on ``spec.pairs`` and write ``spec.output`` (best) and ``*.last.pt``."""
    device = pick_device(spec.device)
    amp = device.type == "cuda" if spec.amp is None else bool(spec.amp and device.type == "cuda")
    start = _resume_state(spec) if spec.resume else None
    model_spec = start["spec"] if start else spec.model
    pairs = open_pairs(spec.pairs, dims=model_spec.dims, in_channels=model_spec.in_channels, norm=model_spec.norm, val_fraction=spec.val_fraction)
    if not start:
        kind, classes = detect_targets(pairs, spec.targets)
        names = INSTANCE_CLASSES if kind == "instances" else tuple(f"class_{i}" for i in range(classes))
        model_spec = replace(model_spec, classes=classes, class_names=names)
    net = _build_net(spec, model_spec, start).to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=spec.learning_rate)
    if start:
        optimizer.load_state_dict(start["optimizer"])
    ps = _patch_spec(spec, net)
    prepare_targets(pairs, ps)
    report = TrainReport(best=spec.output, last=last_path(spec.output))
    report.history, report.best_score = (list(start["history"]), float(start["best_score"])) if start else ([], -1.0)
    best_rank = max((_rank(e) for e in report.history), default=(-np.inf,))
    for epoch in range(int(start["epoch"]) + 1 if start else 0, spec.epochs):
        t0 = time.perf_counter()
        loss = _train_epoch(net, optimizer, pairs, ps, spec, epoch, device, amp, progress)
        scores = validate(net, pairs, ps, device=device)
        entry = {"epoch": epoch, "loss": loss, "seconds": time.perf_counter() - t0, **scores}
        report.history.append(entry)
        if _rank(entry) > best_rank or not os.path.exists(spec.output):
            best_rank, report.best_score = _rank(entry), _rank(entry)[0]
            save_checkpoint(spec.output, net, extra=_extra(spec, epoch, report, None))
        save_checkpoint(report.last, net, extra=_extra(spec, epoch, report, optimizer))
        log.info("epoch %d: %s", epoch, " ".join(f"{k}={v:.4g}" for k, v in entry.items() if k != "epoch"))
    return report


def _rank(entry: dict[str, float]) -> tuple[float, ...]:
    """How an epoch ranks for the best checkpoint: object F1, then foreground IoU.

    A validation part holds few objects, so F1 ties are common (one missed object
    in twelve for many epochs); the foreground IoU breaks them, rather than keeping
    the first, least trained epoch. Without F1 (class maps): IoU; without either: -loss.

    >>> _rank({"loss": 0.4, "f1": 0.9, "foreground_iou": 0.95}) > _rank({"loss": 0.5, "f1": 0.9, "foreground_iou": 0.94})
    True
    """
    if "f1" in entry:
        return (entry["f1"], entry.get("foreground_iou", 0.0))
    return (entry["foreground_iou"],) if "foreground_iou" in entry else (-entry["loss"],)


def _build_net(spec: TrainSpec, model_spec: ModelSpec, start: dict[str, Any] | None) -> UNet:
    torch.manual_seed(spec.seed)
    if start:
        return start["net"]
    net = UNet(model_spec)
    if spec.init:
        init = load_checkpoint(spec.init).net
        if init.spec.to_dict() != model_spec.to_dict():
            raise ConfigError(f"--init model {spec.init} has spec {init.spec.to_dict()} which does not match the training spec {model_spec.to_dict()}; train from scratch or match --dims/--depth/--width/--padding")
        net.load_state_dict(init.state_dict())
    return net


def _resume_state(spec: TrainSpec) -> dict[str, Any]:
    path = last_path(spec.output)
    if not os.path.exists(path):
        raise InputNotFoundError(f"--resume found no {path}; start without --resume (or point at the model of the run to continue)")
    ckpt = load_checkpoint(path)
    extra = ckpt.extra
    return {
        "net": ckpt.net, "spec": ckpt.spec, "epoch": extra["epoch"], "optimizer": extra["optimizer"],
        "history": extra.get("history", []), "best_score": extra.get("best_score", -1.0),
    }


def _extra(spec: TrainSpec, epoch: int, report: TrainReport, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    extra: dict[str, Any] = {
        "epoch": epoch, "history": report.history, "best_score": report.best_score,
        "train_spec": spec.to_dict(), "made_by": "unetflow train",
    }
    if optimizer is not None:
        extra["optimizer"] = optimizer.state_dict()
    return extra


def _patch_spec(spec: TrainSpec, net: UNet) -> PatchSpec:
    geo = net.geometry
    dims = net.spec.dims
    if spec.patch_shape:
        patch = tuple(spec.patch_shape)
        if len(patch) == 1:
            patch = patch * dims
    else:
        size = DEFAULT_TRAIN_PATCH[dims]
        patch = ((geo.valid_input_at_least(size) if geo.padding == "valid" else size),) * dims
    out = geo.output_shape(patch)
    return PatchSpec(patch, tuple(out), geo.margin, "instances" if net.spec.class_names == INSTANCE_CLASSES else "classes",
                     spec.w0, spec.sigma, spec.elastic_strength, spec.elastic_grid)


def _train_epoch(net: UNet, optimizer: torch.optim.Optimizer, pairs: list[Pair], ps: PatchSpec, spec: TrainSpec,
                 epoch: int, device: torch.device, amp: bool, progress: bool) -> float:
    from tqdm.auto import tqdm

    rng = np.random.default_rng([spec.seed, epoch])
    torch.manual_seed(spec.seed * 100_003 + epoch)
    net.train()
    total = 0.0
    bar = tqdm(range(spec.steps_per_epoch), desc=f"epoch {epoch + 1}/{spec.epochs}", disable=not progress, leave=False, dynamic_ncols=True)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(spec, epoch * spec.steps_per_epoch + step)
        samples = [sample_patch(pairs[int(rng.integers(len(pairs)))], rng, ps, net.spec.norm) for _ in range(spec.batch_size)]
        x, t, w = (torch.from_numpy(np.stack(a)).to(device) for a in zip(*samples))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = net(x)
        loss = _loss(logits.float(), t, w, spec.loss)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.detach().item()
        bar.set_postfix(loss=f"{total / (step + 1):.4f}")
    return total / spec.steps_per_epoch


def learning_rate_at(spec: TrainSpec, step: int) -> float:
    """The learning rate of global *step* (0-based): a pure function of the step, so a
    resumed run continues the schedule exactly.

    ``constant``: ``learning_rate``; ``cosine``: ``learning_rate * (1 + cos(pi * step / n)) / 2``
    over the run's ``n = epochs * steps`` steps (Loshchilov and Hutter 2017, no restarts).

    >>> spec = TrainSpec(pairs=(("a", "b"),), output="m.pt", epochs=2, steps_per_epoch=2, lr_schedule="cosine")
    >>> [round(learning_rate_at(spec, s), 6) for s in range(4)]
    [0.001, 0.000854, 0.0005, 0.000146]
    """
    if spec.lr_schedule == "constant":
        return spec.learning_rate
    total = spec.epochs * spec.steps_per_epoch
    return spec.learning_rate * 0.5 * (1.0 + math.cos(math.pi * step / total))


def _loss(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "ce":
        return weighted_cross_entropy(logits, target, weight)
    if kind == "dice":
        return soft_dice_loss(logits, target)
    return weighted_cross_entropy(logits, target, weight) + soft_dice_loss(logits, target)


def validate(net: UNet, pairs: list[Pair], ps: PatchSpec, *, device: torch.device) -> dict[str, float]:
    """Scores on the held-out parts (capped to a central crop): foreground IoU, object F1."""
    from unetflow.evaluate import evaluate
    from unetflow.label import instance_classes, label_whole

    boxes = [(p, _val_crop(p.val_box, net.spec.dims)) for p in pairs if p.val_box is not None]
    if not boxes:
        return {}
    net.eval()
    predictor = Predictor(net, device=device, amp=False)
    tiling = make_tiling(net.geometry, ps.patch, blend="gaussian", overlap=0.25)
    preds, truths, offset = [], [], 0
    for pair, box in boxes:
        image, labels = read_region(pair, box, net.spec.norm)
        probs = predict_array(predictor, image, tiling)
        classes = probs.argmax(axis=0)
        if ps.targets == "instances":  # the rule of `--output instances`; ids offset per pair so pairs never match
            pred = label_whole(instance_classes(probs)).ravel().astype(np.int64)
            true = labels.ravel().astype(np.int64)
            preds.append(np.where(pred > 0, pred + offset, 0))
            truths.append(np.where(true > 0, true + offset, 0))
            offset += int(max(pred.max(initial=0), true.max(initial=0)))
        else:
            preds.append((classes > 0).ravel().astype(np.uint32))
            truths.append((labels > 0).ravel().astype(np.uint32))
    net.train()
    scores = evaluate(np.concatenate(preds), np.concatenate(truths)) if ps.targets == "instances" else {}
    if ps.targets != "instances":
        from unetflow.evaluate import foreground_iou

        scores = {"foreground_iou": foreground_iou(np.concatenate(preds), np.concatenate(truths))}
    return {k: float(v) for k, v in scores.items() if isinstance(v, (int, float, np.floating, np.integer))}


def _val_crop(box: Box, dims: int) -> Box:
    edge = MAX_VAL_EDGE[dims]
    shape = tuple(min(s, edge) for s in box.shape)
    offset = tuple(o + (s - c) // 2 for o, s, c in zip(box.offset, box.shape, shape))
    return Box(offset, shape)
