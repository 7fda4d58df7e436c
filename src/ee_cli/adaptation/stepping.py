"""Exact BatchNorm adaptation in about one pass over the photos, however many layers it adapts.

Frozen BN layers ignore `training=True`, so their statistics are computed here: a layer's are those
of its input with every earlier adapted layer already adapted. They never depend on later layers, so
the first n of them are the exact statistics of adapting n (`adapt.set_statistics` switches depth
without a pass), but they must go one wave of layers at a time (`adapt.batchnorm_waves`). Run from
the photos, wave after wave, that recomputed the network's front for every layer: 32 layers of
EfficientNet-Lite1 at 240 px cost 7.5 whole passes' MACs; from stones, 0.98. Here each wave starts from a stepping stone
instead: the output, for every photo, of a layer that every path to the output crosses
(`graft.articulation_layers`), computed with every layer upstream of it already adapted. A wave's
pass reads the stone, measures its layers' inputs and writes the next stone. Stones live on disk,
written and read a batch of photos at a time, so memory stays independent of the photo count. The
photos themselves are kept the same way by the first pass that reads them all, so each is decoded
once however many passes start from them (decoding once, with the graph traced once, took a ResNet-9
user's five class-mix passes from 7.9 to 4.8 s).
"""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from ee_cli.base import compat
from ee_cli.graph import graft, stages
from ee_cli.adaptation import adapt


class Stepping:
    """Adapts the first layers of `model`'s backbone BatchNorms (`deepen`) and reads `target` (an
    output layer's name) at the current statistics (`read`), each pass from the latest stone.
    `batches()` gives the photos as uint8 batches, in the same order every time; it is called until
    one pass has read them all, and that pass's batches are then read back from disk."""

    def __init__(self, model, target: str, batches: Callable[[], Iterable], workdir: Path, done: int = 0):
        keras = compat.keras()
        self.model, self.batches, self.workdir = model, batches, Path(workdir)
        self.target_name, self.target = target, model.get_layer(target).output
        graph = graft.layer_graph(keras.Model(model.inputs, self.target))
        self.graph = graft.layer_graph(model)
        self.target_macs = graft.cumulative_macs(self.graph, target)
        self.position = {name: index for index, name in enumerate(graph.order)}
        self.cuts = sorted(graft.articulation_layers(graph) - set(model.input_names), key=self.position.get)
        self.layers = adapt.backbone_batchnorms(model)
        self.done = done  # the first `done` layers hold the photos' statistics
        self.stone: Stone | None = None  # None: the photos themselves
        self.photos: Stone | None = None  # the decoded photos, once a pass has read them all
        self.passes: list[float] = []  # per pass, the share of the target's MACs it ran

    def deepen(self, count: int) -> adapt.Statistics:
        """Adapt layers `done` to `count`; returns their statistics."""
        chosen = self.layers[self.done : count]
        computed: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for wave in adapt.batchnorm_waves(self.model, chosen):
            found = self._pass(wave, self._next_stone(wave), self.stone)
            adapt.assign(wave, found)
            computed |= {layer.name: statistics for layer, statistics in zip(wave, found)}
        self.done = max(self.done, count)
        return [computed[layer.name] for layer in chosen]

    def read(self, depth: int) -> np.ndarray:
        """`target` on every photo, with the first `depth` layers adapted and the rest as the model
        holds them: from the stone when every layer upstream of it is among those `depth`."""
        usable = self.stone is not None and self._upstream_batchnorms(self.stone.name) <= depth
        collected: list[np.ndarray] = []
        self._pass([], None, self.stone if usable else None, collected)
        return np.concatenate(collected)

    def _upstream_batchnorms(self, name: str) -> int:
        return sum(self.position.get(layer.name, -1) < self.position[name] for layer in self.layers)

    def _next_stone(self, wave: list) -> str | None:
        """The narrowest cut (the latest of equals) between the current stone and the wave's first
        layer: a block's narrow output rather than its expansion inside, which cost more to write and
        read back (Lite1: 96 channels at 120 px, 5.5 MB a photo) than its 1x1 convolution costs to redo."""
        first = min(self.position[layer.name] for layer in wave)
        current = self.position[self.stone.name] if self.stone else -1
        between = [name for name in self.cuts if current < self.position[name] < first]
        return min(reversed(between), key=self._size) if between else None

    def _size(self, name: str) -> int:
        return math.prod(self.model.get_layer(name).output.shape[1:])

    def _pass(self, measured: list, new_stone: str | None, start: Stone | None, collected: list | None = None) -> adapt.Statistics:
        """One pass from `start` (None: the photos): the moments of the `measured` layers' inputs, and
        either the new stone (written to disk) or the target's values (appended to `collected`)."""
        stone = Stone(new_stone, self.workdir / f"stone-{len(self.passes)}") if new_stone else None  # layer names may hold '/'
        keep = stone.append if stone else collected.append if collected is not None else None
        ends = [self.graph.producers[layer.name][0] for layer in measured] + ([new_stone or self.target_name] if keep else [])
        origin = start.name if start else None

        def segment(values):  # the layers called on the traced batch itself: no Keras model to build
            return stages.segment_tensors(self.model, origin, ends, self.graph, inputs=values)[1]

        shape = self.model.get_layer(origin).output.shape if origin else self.model.input_shape
        found = adapt.input_statistics(segment, start.chunks if start else self._photo_batches(), keep=keep, shape=tuple(shape[1:]))
        self.passes.append(self._share(start, ends))
        if stone:
            if self.stone:
                self.stone.remove()
            self.stone = stone
        return found

    def _photo_batches(self) -> Callable[[], Iterable[np.ndarray]]:
        if self.photos is not None:
            return self.photos.chunks
        kept = Stone(self.model.input_names[0], self.workdir / "photos")

        def keeping():
            for images in self.batches():
                kept.append(images)
                yield images
            self.photos = kept  # only a pass that reached the end is read back

        return keeping

    def _share(self, start: Stone | None, names: list[str]) -> float:
        """The MACs a pass ran, as a share of the target's: bookkeeping for the forward-pass bound."""
        done = graft.cumulative_macs(self.graph, start.name) if start else 0
        return (graft.cumulative_macs(self.graph, names) - done) / self.target_macs if self.target_macs else 0.0


class Stone:
    """One layer's output for every photo, as .npy files of the photos' batches."""

    def __init__(self, name: str, folder: Path):
        self.name, self.folder, self.count = name, folder, 0
        folder.mkdir(parents=True, exist_ok=True)

    def append(self, values: np.ndarray) -> None:
        np.save(self.folder / f"{self.count:06d}.npy", values)
        self.count += 1

    def chunks(self) -> Iterable[np.ndarray]:
        return (np.load(self.folder / f"{index:06d}.npy") for index in range(self.count))

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def adapt_batchnorm(model, batches, count: int, start: int = 0) -> adapt.Statistics:
    """Set the statistics of BN layers `start` to `count` to those of the photos (the first `start`
    already adapted); returns theirs. Stones go to a temporary folder, removed on return."""
    from ee_cli.graph.personal_model import generic_output

    target = generic_output(model) if generic_output(model) in model.output_names else model.output_names[0]  # a plain Keras classifier
    with tempfile.TemporaryDirectory(prefix="ee-stones-") as workdir:
        return Stepping(model, target, batches, Path(workdir), done=start).deepen(count)
