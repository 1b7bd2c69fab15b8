"""A scan's feature vector from the nnU-Net bottleneck, captured during prediction.

While nnU-Net's sliding window runs, a forward hook on the deepest encoder stage (the
bottleneck, ``network.encoder.stages[-1]`` in dynamic-network-architectures' U-Nets) averages
each tile's activations over space: one value per bottleneck channel and tile. Only the first,
unmirrored network pass of a tile is used, so the vector is the same with or without
test-time augmentation. The scan's vector is the mean over the tiles whose centre lies in the
brain: the non-zero region of the model input, as nnU-Net's own preprocessing finds it
(``crop_to_nonzero``, holes filled), on the preprocessed grid. When no tile centre is in the
brain (a tiny brain), tiles that touch it are used, else all tiles.

With several folds, the vector comes from one fold's network (the reference fold the model
card's ``ood`` section names, else the first fold run): each fold's network has its own
feature space, and averaging channels of different networks mixes unrelated features.

Saved per image as ``<source>_desc-embedding_features.tsv`` (two columns: ``feature``,
``value``) with a JSON sidecar naming the layer, pooling, fold and the sha256 of that fold's
checkpoint (:func:`write_embedding`, :func:`read_embedding`).
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import numpy as np

LAYER = "encoder.stages[-1]"
POOLING = ("mean over space of each tile's bottleneck activations (first, unmirrored pass), "
           "then mean over the sliding-window tiles whose centre is in the brain (non-zero "
           "model input)")


def bottleneck_module(network):
    """The deepest encoder stage of an nnU-Net network (``encoder.stages[-1]``).

    Raises
    ------
    ValueError
        The network has no ``encoder.stages`` (an architecture this module does not know).
    """
    network = getattr(network, "_orig_mod", network)      # torch.compile wrapper
    network = getattr(network, "module", network)         # DistributedDataParallel
    stages = getattr(getattr(network, "encoder", None), "stages", None)
    if stages is None or len(stages) == 0:
        raise ValueError(f"{type(network).__name__} has no encoder.stages; cannot find the "
                         "bottleneck")
    return stages[-1]


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


class BottleneckCapture:
    """Collect the pooled bottleneck features of every tile of one sliding-window prediction.

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
        self._features: dict[int, np.ndarray] = {}
        self._tile = -1
        self._armed = False
        self.padded_shape: tuple[int, ...] | None = None

    def _hook(self, module, inputs, output):
        if not self._armed:
            return
        self._armed = False            # mirrored passes of the same tile are not recorded
        out = output[-1] if isinstance(output, (list, tuple)) else output
        # stays on the device: a copy to the CPU here would stall the GPU at every tile
        self._features[self._tile] = out.detach().float().mean(dim=tuple(range(2, out.ndim)))[0]

    @contextlib.contextmanager
    def attached(self, predictor):
        """Hook ``predictor``'s network and count its tiles for the duration of the block."""
        module = bottleneck_module(predictor.network)
        handle = module.register_forward_hook(self._hook)
        get_slicers = predictor._internal_get_sliding_window_slicers
        predict_tile = predictor._internal_maybe_mirror_and_predict

        def slicers(image_size):
            self.padded_shape = tuple(int(s) for s in image_size)
            self.slicers = get_slicers(image_size)
            return self.slicers

        def tile(x):
            # tiles arrive in slicer order (one producer thread, a FIFO queue); a retry on
            # the CPU after a GPU out-of-memory starts again at tile 0
            self._tile = (self._tile + 1) % max(1, len(self.slicers))
            self._armed = True
            return predict_tile(x)

        predictor._internal_get_sliding_window_slicers = slicers
        predictor._internal_maybe_mirror_and_predict = tile
        try:
            yield self
        finally:
            handle.remove()
            for name in ("_internal_get_sliding_window_slicers",
                         "_internal_maybe_mirror_and_predict"):
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
        """The scan's vector and how it was pooled (tiles used, rule)."""
        if not self.slicers or len(self._features) != len(self.slicers):
            raise RuntimeError(f"the bottleneck hook saw {len(self._features)} of "
                               f"{len(self.slicers)} tiles")
        chosen, rule = self.tile_selection()
        import torch

        stack = torch.stack([self._features[i] for i in range(len(self.slicers))])
        stack = stack.cpu().numpy().astype(np.float64)
        vector = stack[chosen].mean(axis=0)
        return vector, {"Layer": LAYER, "Pooling": POOLING, "TileRule": rule,
                        "TilesUsed": int(chosen.sum()), "TilesTotal": len(self.slicers)}


def feature_names(n: int) -> list[str]:
    """``bottleneck_000`` .. names of the vector's entries (one per bottleneck channel).

    >>> feature_names(2)
    ['bottleneck_000', 'bottleneck_001']
    """
    return [f"bottleneck_{i:03d}" for i in range(n)]


def embedding_tsv(vector: np.ndarray) -> str:
    """The TSV text of an embedding: ``feature``/``value`` columns, one row per channel.

    >>> print(embedding_tsv(np.array([0.5, 1.25])), end="")
    feature	value
    bottleneck_000	0.5
    bottleneck_001	1.25
    """
    lines = ["feature\tvalue"]
    lines += [f"{name}\t{float(v):.9g}" for name, v in zip(feature_names(len(vector)), vector)]
    return "\n".join(lines) + "\n"


def embedding_sidecar(info: dict[str, Any]) -> dict[str, Any]:
    """The JSON sidecar of an embedding TSV: column docs plus how the vector was made."""
    return {
        "Description": "Feature vector of the scan from the segmentation network's bottleneck "
                       "(see docs/ood.md); its Mahalanobis distance to the model card's "
                       "reference is the out-of-distribution score.",
        "feature": {"Description": "bottleneck channel"},
        "value": {"Description": "mean activation of the channel (arbitrary units)"},
        **info,
    }


def parse_embedding_tsv(text: str) -> np.ndarray:
    """The vector from an embedding TSV's text (raises ValueError when it is not one).

    >>> parse_embedding_tsv("feature\\tvalue\\nbottleneck_000\\t2\\n").tolist()
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
