"""A scan's feature vector from the nnU-Net encoder, captured during prediction.

While nnU-Net's sliding window runs, a forward hook on every encoder stage
(``network.encoder.stages[k]`` in dynamic-network-architectures' U-Nets, from the first,
full-resolution stage down to the bottleneck) pools each tile's activations over space: the
mean and the standard deviation of every channel. Only the first, unmirrored network pass of a
tile is used, so the vector is the same with or without test-time augmentation. The scan's
vector is the mean over the tiles whose centre lies in the brain: the non-zero region of the
model input, as nnU-Net's own preprocessing finds it (``crop_to_nonzero``, holes filled), on
the preprocessed grid. When no tile centre is in the brain (a tiny brain), tiles that touch it
are used, else all tiles.

The vector is made of one block per stage (``stage0``: the channel means, then the channel
standard deviations; then ``stage1`` ...). The early stages see the image's contrast, noise
and texture; the bottleneck what the network makes of them. On the demo model the first stage
tells another field strength or sequence apart far better than the bottleneck (ROC AUC 1.00
against 0.79 on phantoms, docs/ood.md), which is why every stage is kept and scored on its own
(:func:`cl_bidsapp.core.ood.ood_score`).

With several folds, the vector comes from one fold's network (the reference fold the model
card's ``ood`` section names, else the first fold run): each fold's network has its own
feature space, and averaging channels of different networks mixes unrelated features.

Saved per image as ``<source>_desc-embedding_features.tsv`` (two columns: ``feature``,
``value``) with a JSON sidecar naming the layers, pooling, blocks, fold and the sha256 of that
fold's checkpoint (:func:`embedding_tsv`, :func:`embedding_sidecar`, :func:`read_embedding`).
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import numpy as np

LAYERS = "encoder.stages[0..-1]"
POOLING = ("per tile (first, unmirrored pass), the mean and the standard deviation over space "
           "of each channel of each encoder stage; then the mean over the sliding-window tiles "
           "whose centre is in the brain (non-zero model input)")


def encoder_stages(network) -> list:
    """The encoder stages of an nnU-Net network (``encoder.stages``), shallowest first.

    Raises
    ------
    ValueError
        The network has no ``encoder.stages`` (an architecture this module does not know).
    """
    network = getattr(network, "_orig_mod", network)      # torch.compile wrapper
    network = getattr(network, "module", network)         # DistributedDataParallel
    stages = getattr(getattr(network, "encoder", None), "stages", None)
    if stages is None or len(stages) == 0:
        raise ValueError(f"{type(network).__name__} has no encoder.stages; cannot take its "
                         "features")
    return list(stages)


def block_layout(channels) -> list[tuple[str, int, int]]:
    """(name, start, stop) of each stage's block in the vector: means then stds per channel.

    >>> block_layout([2, 4])
    [('stage0', 0, 4), ('stage1', 4, 12)]
    """
    out, start = [], 0
    for k, c in enumerate(channels):
        out.append((f"stage{k}", start, start + 2 * int(c)))
        start += 2 * int(c)
    return out


def feature_names(channels) -> list[str]:
    """Names of the vector's entries, stage by stage: ``stage0_mean_000`` .. ``stage0_std_000``.

    >>> feature_names([2])
    ['stage0_mean_000', 'stage0_mean_001', 'stage0_std_000', 'stage0_std_001']
    """
    names = []
    for k, c in enumerate(channels):
        for stat in ("mean", "std"):
            names += [f"stage{k}_{stat}_{i:03d}" for i in range(int(c))]
    return names


def tile_centres_in(mask: np.ndarray, slicers) -> np.ndarray:
    """For each sliding-window slicer, whether the tile's centre voxel is inside ``mask``.

    ``slicers`` are nnU-Net's (``(slice(None), slice, slice, slice)``), over ``mask``'s grid.

    >>> m = np.zeros((8, 8, 8), bool); m[:4] = True
    >>> sl = [(slice(None), slice(0, 4), slice(0, 4), slice(0, 4)),
    ...       (slice(None), slice(4, 8), slice(0, 4), slice(0, 4))]
    >>> tile_centres_in(m, sl).tolist()
    [True, False]
    """
    out = []
    for sl in slicers:
        spatial = sl[-mask.ndim:]
        centre = tuple((s.start + s.stop) // 2 for s in spatial)
        out.append(bool(mask[centre]))
    return np.array(out, dtype=bool)


def tiles_touching(mask: np.ndarray, slicers) -> np.ndarray:
    """For each slicer, whether its tile holds any voxel of ``mask``."""
    return np.array([bool(mask[sl[-mask.ndim:]].any()) for sl in slicers], dtype=bool)


class FeatureCapture:
    """Collect the pooled encoder features of every tile of one sliding-window prediction.

    Use :meth:`attached` around ``nnUNetPredictor.predict_sliding_window_return_logits``;
    then :meth:`embedding` gives the scan's vector.

    Parameters
    ----------
    brain : ndarray of bool
        The brain (non-zero input) on nnU-Net's preprocessed grid, before padding.
    """

    def __init__(self, brain: np.ndarray):
        self.brain = np.asarray(brain, dtype=bool)
        self.slicers: list = []
        self._features: dict[int, dict[int, Any]] = {}
        self._tile = -1
        self._pending: set[int] = set()
        self._n_stages = 0
        self.padded_shape: tuple[int, ...] | None = None

    def _hook(self, stage: int):
        def hook(module, inputs, output):
            if stage not in self._pending:
                return
            self._pending.discard(stage)   # mirrored passes of the same tile are not recorded
            out = output[-1] if isinstance(output, (list, tuple)) else output
            flat = out.detach()[0].float().flatten(1)
            std, mean = _std_mean(flat)
            # stays on the device: a copy to the CPU here would stall the GPU at every tile
            self._features.setdefault(self._tile, {})[stage] = (mean, std)
        return hook

    @contextlib.contextmanager
    def attached(self, predictor):
        """Hook ``predictor``'s network and count its tiles for the duration of the block."""
        stages = encoder_stages(predictor.network)
        self._n_stages = len(stages)
        handles = [m.register_forward_hook(self._hook(k)) for k, m in enumerate(stages)]
        get_slicers = predictor._internal_get_sliding_window_slicers
        predict_tile = predictor._internal_maybe_mirror_and_predict
        sliding_window = predictor._internal_predict_sliding_window_return_logits

        def slicers(image_size):
            self.padded_shape = tuple(int(s) for s in image_size)
            self.slicers = get_slicers(image_size)
            return self.slicers

        def tile(x):
            # tiles arrive in slicer order (one producer thread, a FIFO queue)
            self._tile = (self._tile + 1) % max(1, len(self.slicers))
            self._pending = set(range(len(stages)))
            return predict_tile(x)

        def window(*args, **kwargs):
            # nnU-Net reruns the whole sliding window (same slicers) with results on the CPU
            # after a GPU out-of-memory: count the tiles again from the first
            self._tile, self._features = -1, {}
            return sliding_window(*args, **kwargs)

        predictor._internal_get_sliding_window_slicers = slicers
        predictor._internal_maybe_mirror_and_predict = tile
        predictor._internal_predict_sliding_window_return_logits = window
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()
            for name in ("_internal_get_sliding_window_slicers",
                         "_internal_maybe_mirror_and_predict",
                         "_internal_predict_sliding_window_return_logits"):
                predictor.__dict__.pop(name, None)

    def tile_selection(self) -> tuple[np.ndarray, str]:
        """Which tiles count, and the rule that chose them."""
        brain = self._padded_brain()
        chosen = tile_centres_in(brain, self.slicers)
        if chosen.any():
            return chosen, "tile centre in the brain"
        chosen = tiles_touching(brain, self.slicers)
        if chosen.any():
            return chosen, "tile touches the brain (no tile centre is in it)"
        return np.ones(len(self.slicers), dtype=bool), "all tiles (the input is empty)"

    def _padded_brain(self) -> np.ndarray:
        from acvl_utils.cropping_and_padding.padding import pad_nd_image

        if self.padded_shape is None or self.padded_shape == self.brain.shape:
            return self.brain
        # the same padding nnU-Net applies to the image before slicing it into tiles
        padded = pad_nd_image(self.brain[None].astype(np.uint8), self.padded_shape, "constant",
                              {"constant_values": 0}, False, None)
        return padded[0].astype(bool)

    def embedding(self) -> tuple[np.ndarray, dict[str, Any]]:
        """The scan's vector and how it was pooled (layers, blocks, tiles used, rule)."""
        complete = [t for t, f in self._features.items() if len(f) == self._n_stages]
        if not self.slicers or not self._n_stages or len(complete) != len(self.slicers):
            raise RuntimeError(f"the encoder hooks saw {len(complete)} of "
                               f"{len(self.slicers)} tiles")
        chosen, rule = self.tile_selection()
        import torch

        n_stages = self._n_stages
        per_tile = torch.stack([
            torch.cat([torch.cat(self._features[i][k]) for k in range(n_stages)])
            for i in range(len(self.slicers))])
        per_tile = per_tile.cpu().numpy().astype(np.float64)
        vector = per_tile[chosen].mean(axis=0)
        channels = [int(self._features[0][k][0].numel()) for k in range(n_stages)]
        blocks = [{"name": n, "start": a, "stop": b} for n, a, b in block_layout(channels)]
        return vector, {"Layers": LAYERS, "Pooling": POOLING, "Channels": channels,
                        "Blocks": blocks, "TileRule": rule, "TilesUsed": int(chosen.sum()),
                        "TilesTotal": len(self.slicers)}


def _std_mean(flat):
    """Population standard deviation and mean of each row of a 2-D tensor."""
    import torch

    return torch.std_mean(flat, dim=1, correction=0)


def embedding_tsv(vector: np.ndarray, names: list[str] | None = None) -> str:
    """The TSV text of an embedding: ``feature``/``value`` columns, one row per value.

    >>> print(embedding_tsv(np.array([0.5, 1.25]), ["stage0_mean_000", "stage0_std_000"]),
    ...       end="")
    feature	value
    stage0_mean_000	0.5
    stage0_std_000	1.25
    """
    names = names or [f"feature_{i:03d}" for i in range(len(vector))]
    if len(names) != len(vector):
        raise ValueError(f"{len(names)} names for {len(vector)} values")
    lines = ["feature\tvalue"]
    lines += [f"{name}\t{float(v):.9g}" for name, v in zip(names, vector)]
    return "\n".join(lines) + "\n"


def embedding_sidecar(info: dict[str, Any]) -> dict[str, Any]:
    """The JSON sidecar of an embedding TSV: column docs plus how the vector was made."""
    return {
        "Description": "Feature vector of the scan from the segmentation network's encoder "
                       "stages (see docs/ood.md); its distance to the model card's reference "
                       "is the out-of-distribution score.",
        "feature": {"Description": "stageK_mean_C / stageK_std_C: mean / standard deviation "
                                   "over space of channel C of encoder stage K (0: full "
                                   "resolution; the last: the bottleneck)"},
        "value": {"Description": "activation statistic, averaged over the tiles in the brain "
                                 "(arbitrary units)"},
        **info,
    }


def parse_embedding_tsv(text: str) -> np.ndarray:
    """The vector from an embedding TSV's text (raises ValueError when it is not one).

    >>> parse_embedding_tsv("feature\\tvalue\\nstage0_mean_000\\t2\\n").tolist()
    [2.0]
    """
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines or lines[0].split("\t") != ["feature", "value"]:
        raise ValueError("not an embedding table (header must be 'feature<TAB>value')")
    values = []
    for n, line in enumerate(lines[1:], start=2):
        cells = line.split("\t")
        if len(cells) != 2:
            raise ValueError(f"line {n} has {len(cells)} cells, expected 2")
        values.append(float(cells[1]))
    if not values:
        raise ValueError("the table has no features")
    vector = np.array(values)
    if not np.all(np.isfinite(vector)):
        raise ValueError("the table has NaN or infinite values")
    return vector


def read_embedding(path: str | Path) -> tuple[np.ndarray, dict[str, Any]]:
    """An embedding TSV and its sidecar (empty dict when the sidecar is missing)."""
    path = Path(path)
    vector = parse_embedding_tsv(path.read_text(encoding="utf-8"))
    side = path.with_name(path.name[: -len(".tsv")] + ".json")
    try:
        meta = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        meta = {}
    return vector, meta if isinstance(meta, dict) else {}
