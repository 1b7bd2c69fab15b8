"""A small CPU training loop for nnU-Net networks on nnU-Net-preprocessed data (demo model).

Used by ``scripts/train_demo_model.py``. nnU-Net's own trainer spends most of a shared 2-core
CPU on spatial data augmentation and needs far more iterations (SGD, 1000 epochs) than a demo
can afford. This loop keeps what matters for a faithful nnU-Net model: the network planned in
``plans.json``, nnU-Net's preprocessed arrays (cropping, z-score within the brain) as input,
and nnU-Net's Dice + cross-entropy loss; it changes the optimiser (AdamW with nnU-Net's
polynomial decay), samples a share of patches around lesions (each lesion equally likely,
whatever its size: most cortical lesions are a few voxels, and voxel-weighted sampling would
show the network mostly the few large ones), and augments with flips (the axes test-time
augmentation mirrors) and intensity jitter only. Optionally it mines hard lesions: every
``mine_every`` iterations it predicts a patch around every training lesion and from then on
centres lesion patches on each lesion in proportion to how badly the network still finds it
(on 2 mm phantoms the network had learnt the leukocortical lesions, which touch white matter,
and kept missing the intracortical ones, which look like a fold of the cortex's CSF edge).
It can start from another run's weights (``init_weights``) with a fresh optimiser and schedule.

>>> import numpy as np
>>> image = np.zeros((20, 20, 20), np.float32); image[4:16, 4:16, 4:16] = 1
>>> lesion = np.zeros(image.shape, bool); lesion[10, 10, 10] = True
>>> sampler = PatchSampler([(image, lesion)], patch=8, lesion_fraction=1.0,
...                        rng=np.random.default_rng(0))
>>> x, y = sampler.batch(2)
>>> x.shape, y.shape, int(y.sum())
((2, 1, 8, 8, 8), (2, 1, 8, 8, 8), 2)
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)


def load_preprocessed_cases(folder: str | Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """nnU-Net's preprocessed cases in ``folder`` as (image, lesion mask) pairs."""
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    dataset = nnUNetDatasetBlosc2(str(folder))
    cases = []
    for identifier in dataset.identifiers:
        data, seg, _, _ = dataset.load_case(identifier)
        # nnU-Net marks voxels outside the brain -1: background for training
        cases.append((np.asarray(data[:], np.float32)[0], np.asarray(seg[:])[0] > 0))
    return cases


def lesion_voxels(seg: np.ndarray) -> list[np.ndarray]:
    """The voxel coordinates of each lesion (26-connected component) of a mask.

    >>> seg = np.zeros((6, 6, 6), bool); seg[0, 0, :3] = True; seg[5, 5, 5] = True
    >>> [len(v) for v in lesion_voxels(seg)]
    [3, 1]
    """
    from cl_bidsapp.core.components import label_components

    labels, n = label_components(seg)
    if n == 0:
        return []
    order = np.argsort(labels, axis=None, kind="stable")
    flat = labels.ravel()[order]
    starts = np.searchsorted(flat, np.arange(1, n + 2))
    coords = np.column_stack(np.unravel_index(order, seg.shape))
    return [coords[starts[k]:starts[k + 1]] for k in range(n)]


class PatchSampler:
    """Cubic patches, a share of them centred near a lesion, flipped and intensity-jittered.

    Intensity changes stay inside the brain so that the background remains 0, as it is after
    brain extraction.
    """

    def __init__(self, cases, patch: int, lesion_fraction: float, rng: np.random.Generator):
        self.cases, self.patch, self.lesion_fraction, self.rng = cases, patch, lesion_fraction, rng
        self.lesions = [lesion_voxels(seg) for _, seg in cases]
        self.brain = [np.argwhere(image != 0)[::37] for image, _ in cases]
        #: (case, lesion) of every lesion, and the chance of each being a patch's centre once
        #: hard lesions are mined (None: pick a case, then one of its lesions, uniformly)
        self.index = [(i, k) for i, found in enumerate(self.lesions) for k in range(len(found))]
        self.lesion_weights: np.ndarray | None = None

    def set_difficulty(self, difficulty: np.ndarray, floor: float = 0.2) -> None:
        """Sample lesion ``j`` of :attr:`index` in proportion to ``floor + difficulty[j]``.

        ``difficulty`` is 0 for a lesion the network finds and 1 for one it misses entirely;
        the floor keeps the lesions it already finds in the training mix.

        >>> seg = np.zeros((20, 20, 20), bool); seg[3, 3, 3] = seg[15, 15, 15] = True
        >>> sampler = PatchSampler([(np.ones(seg.shape, np.float32), seg)], 4, 1.0,
        ...                        np.random.default_rng(0))
        >>> sampler.set_difficulty(np.array([0.0, 1.0]), floor=0.25)
        >>> sampler.lesion_weights.round(2).tolist()
        [0.17, 0.83]
        """
        difficulty = np.asarray(difficulty, float)
        if difficulty.shape != (len(self.index),):
            raise ValueError(f"difficulties of shape {difficulty.shape} for "
                             f"{len(self.index)} lesions")
        if not floor > 0:
            raise ValueError(f"floor must be > 0, not {floor}")
        weights = floor + np.clip(difficulty, 0.0, 1.0)
        self.lesion_weights = weights / weights.sum()

    def lesion_patch(self, case: int, lesion: int) -> tuple[np.ndarray, np.ndarray]:
        """The unaugmented patch centred on a lesion: image, and the mask of that lesion."""
        voxels = self.lesions[case][lesion]
        centre = voxels[len(voxels) // 2]
        half = self.patch // 2
        local = voxels - centre + half
        local = local[((local >= 0) & (local < self.patch)).all(1)]
        own = np.zeros((self.patch,) * 3, bool)
        own[tuple(local.T)] = True
        return self._crop(self.cases[case][0], centre), own

    def _crop(self, array: np.ndarray, centre) -> np.ndarray:
        half, out = self.patch // 2, np.zeros((self.patch,) * 3, array.dtype)
        src, dst = [], []
        for c, n in zip(centre, array.shape):
            lo, hi = int(c) - half, int(c) - half + self.patch
            src.append(slice(max(lo, 0), min(hi, n)))
            dst.append(slice(max(lo, 0) - lo, self.patch - (hi - min(hi, n))))
        out[tuple(dst)] = array[tuple(src)]
        return out

    def batch(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        """``size`` patches: images (float32) and labels (int64), both (size, 1, p, p, p)."""
        rng, images, labels = self.rng, [], []
        for _ in range(size):
            i = int(rng.integers(len(self.cases)))
            lesion_centred = rng.random() < self.lesion_fraction
            # (the uniform branch draws in the order versions <= 1.1.0 of the demo model were
            # trained with, so their recorded seeds still reproduce them)
            if lesion_centred and self.lesion_weights is not None:
                i, k = self.index[int(rng.choice(len(self.index), p=self.lesion_weights))]
                jitter = rng.integers(-self.patch // 4, self.patch // 4 + 1, 3)
            elif lesion_centred and len(self.lesions[i]):
                jitter = rng.integers(-self.patch // 4, self.patch // 4 + 1, 3)
                k = int(rng.integers(len(self.lesions[i])))
            else:
                lesion_centred = False
            image, seg = self.cases[i]
            if lesion_centred:
                voxels = self.lesions[i][k]
                centre = voxels[rng.integers(len(voxels))] + jitter
            elif len(self.brain[i]):
                centre = self.brain[i][rng.integers(len(self.brain[i]))]
            else:
                centre = np.array(image.shape) // 2
            x, y = self._crop(image, centre), self._crop(seg, centre)
            for axis in range(3):
                if rng.random() < 0.5:
                    x, y = np.flip(x, axis), np.flip(y, axis)
            x = np.ascontiguousarray(x)
            inside = x != 0
            x[inside] = (x[inside] * rng.uniform(0.85, 1.15) + rng.normal(0, 0.15)
                         + rng.normal(0, rng.uniform(0, 0.1), int(inside.sum())))
            images.append(x)
            labels.append(np.ascontiguousarray(y))
        return (np.stack(images)[:, None].astype(np.float32),
                np.stack(labels)[:, None].astype(np.int64))


@dataclass
class TrainingSettings:
    """What :func:`train_network` does; recorded in the model card."""

    iterations: int = 4000
    batch_size: int = 4
    patch: int = 32
    learning_rate: float = 3e-3
    lesion_fraction: float = 0.66
    lesion_weight: float = 10.0
    seed: int = 0
    threads: int | None = None
    #: ``cpu`` or ``cuda`` (a GPU makes 1 mm phantoms affordable: see docs/models.md)
    device: str = "cpu"
    checkpoint_every: int = 250
    #: predict every training lesion every this many iterations and sample the missed ones
    #: more often (0: never)
    mine_every: int = 0
    history: dict = field(default_factory=lambda: {"iteration": [], "loss": [], "dice": [],
                                                   "seconds": []})


def training_device(name: str):
    """The torch device for ``name`` (``cpu`` or ``cuda``); a clear error when it is absent.

    >>> str(training_device("cpu"))
    'cpu'
    """
    import torch

    if name not in ("cpu", "cuda"):
        raise ValueError(f"training device {name!r}: use cpu or cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"training on cuda was asked for, but torch {torch.__version__} "
                           "sees no CUDA GPU here; use --device cpu")
    return torch.device(name)


def lesion_difficulty(network, sampler: PatchSampler, batch: int = 8) -> np.ndarray:
    """How badly the network finds each lesion of ``sampler.index``: 1 - its highest probability.

    Each lesion is predicted in an unaugmented patch centred on it; the result is in [0, 1]:
    near 0 for a lesion the network detects (however well it outlines it), near 1 for one it
    does not see at all. (The mean over the lesion's voxels would also rank detected large
    lesions as hard, for their under-segmented rims.)
    """
    import torch

    was_training = network.training
    device = next(network.parameters()).device
    network.eval()
    out = np.zeros(len(sampler.index))
    with torch.no_grad():
        for start in range(0, len(sampler.index), batch):
            chunk = sampler.index[start:start + batch]
            patches = [sampler.lesion_patch(i, k) for i, k in chunk]
            x = torch.from_numpy(np.stack([p[0] for p in patches])[:, None].astype(np.float32))
            probability = torch.softmax(network(x.to(device)), 1)[:, 1].cpu().numpy()
            for j, (_, own) in enumerate(patches):
                out[start + j] = 1.0 - float(probability[j][own].max()) if own.any() else 0.0
    network.train(was_training)
    return out


def train_network(architecture: dict, cases, settings: TrainingSettings,
                  checkpoint: Path, resume: bool = False,
                  init_weights: dict | None = None) -> dict:
    """Train the plans' network on ``cases``; save and return the final state.

    Parameters
    ----------
    architecture : dict
        ``plans["configurations"][cfg]["architecture"]``.
    cases : list of (image, lesion mask)
        From :func:`load_preprocessed_cases`.
    settings : TrainingSettings
    checkpoint : Path
        Written every ``checkpoint_every`` iterations and at the end (weights, optimiser,
        iteration, history); with ``resume`` training continues from it.
    init_weights : dict, optional
        Network weights to start from (another run's ``network_weights``: fine-tuning with a
        fresh optimiser and learning-rate schedule); ignored when resuming.

    Returns
    -------
    dict
        ``network_weights``, ``optimizer_state``, ``iteration`` and ``history`` (loss and batch
        Dice every 50 iterations, cumulative seconds).
    """
    import torch
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    device = training_device(settings.device)
    torch.manual_seed(settings.seed)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    network = get_network_from_plans(architecture["network_class_name"],
                                     architecture["arch_kwargs"],
                                     architecture["_kw_requires_import"], 1, 2,
                                     allow_init=True, deep_supervision=False).to(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True   # one patch size throughout
    optimizer = torch.optim.AdamW(network.parameters(), lr=settings.learning_rate,
                                  weight_decay=3e-5)
    # Dice over the whole batch and a heavier lesion class in the cross-entropy: with per-patch
    # Dice the many lesion-free patches teach "predict nothing" (a trap nnU-Net escapes with
    # deep supervision and thousands more iterations).
    loss_fn = DC_and_CE_loss({"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": False},
                             {"weight": torch.tensor([1.0, float(settings.lesion_weight)],
                                                     device=device)},
                             weight_ce=1, weight_dice=1, dice_class=MemoryEfficientSoftDiceLoss)
    history, first, state = settings.history, 0, {}
    if resume and Path(checkpoint).is_file():
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
        network.load_state_dict(state["network_weights"])
        optimizer.load_state_dict(state["optimizer_state"])
        history, first = state["history"], state["iteration"]
        logger.info("resuming at iteration %d", first)
    elif init_weights is not None:
        network.load_state_dict(init_weights)
        logger.info("starting from given weights (fine-tuning)")
    sampler = PatchSampler(cases, settings.patch, settings.lesion_fraction,
                           np.random.default_rng([settings.seed, first]))
    network.train()
    started, losses, dice = time.time(), [], []
    base = history["seconds"][-1] if history["seconds"] else 0.0
    for iteration in range(first, settings.iterations):
        # every mine_every iterations and when a resumed run starts; never on the random guesses
        # of a fresh network at iteration 0 (fine-tuned weights are mined at once)
        due = settings.mine_every and (iteration % settings.mine_every == 0 or iteration == first)
        if due and sampler.index and (iteration > 0 or init_weights is not None):
            difficulty = lesion_difficulty(network, sampler)
            sampler.set_difficulty(difficulty)
            logger.info("iteration %d: %d of %d training lesions still missed (highest probability "
                        "< 0.5); sampling them more often", iteration,
                        int((difficulty > 0.5).sum()), len(difficulty))
        for group in optimizer.param_groups:  # nnU-Net's polynomial decay
            group["lr"] = settings.learning_rate * (1 - iteration / settings.iterations) ** 0.9
        x, y = sampler.batch(settings.batch_size)
        output = network(torch.from_numpy(x).to(device, non_blocking=True))
        loss = loss_fn(output, torch.from_numpy(y).to(device, non_blocking=True))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(network.parameters(), 12)
        optimizer.step()
        with torch.no_grad():  # hard Dice of the batch: is it finding lesions yet?
            hit = (output.argmax(1) == 1).cpu().numpy()
            dice.append(2 * (hit & (y[:, 0] == 1)).sum() / max(1, hit.sum() + (y == 1).sum()))
        losses.append(loss.item())
        done = iteration + 1
        if done % 50 == 0 or done == settings.iterations:
            elapsed = time.time() - started
            history["iteration"].append(done)
            history["loss"].append(float(np.mean(losses)))
            history["dice"].append(float(np.mean(dice)))
            history["seconds"].append(round(base + elapsed, 1))
            logger.info("iteration %d/%d: loss %.3f, batch Dice %.3f, %.2f s/iteration", done,
                        settings.iterations, np.mean(losses), np.mean(dice),
                        elapsed / max(1, done - first))
            losses, dice = [], []
        if done % settings.checkpoint_every == 0 or done == settings.iterations:
            # weights on the CPU: the checkpoint loads on any machine
            state = {"network_weights": {k: v.detach().cpu()
                                         for k, v in network.state_dict().items()},
                     "optimizer_state": optimizer.state_dict(), "iteration": done,
                     "history": history}
            torch.save(state, checkpoint)
    return state
