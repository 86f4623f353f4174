"""A classifier = its preprocessing + an inference backend (raw logits per TTA view) + the decision chain.

What evaluate, predict, serve, Grad-CAM, the report and the Python API (skinlesion.api) run: images become pixels
through the run's ``Preprocessing`` (the one the image cache and the training loaders use), the backend's logits go
through the run's ``DecisionChain`` and nothing else, so every consumer gets the same probabilities and decisions.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import DataLoader
from tqdm import tqdm

from skinlesion.classes import FULL_NAMES
from skinlesion.data.dataset import LesionDataset
from skinlesion.data.preprocessing import Preprocessing, Source
from skinlesion.decision.chain import DecisionChain, Decisions
from skinlesion.decision.safeguards import Guarded, Safeguards
from skinlesion.errors import SkinLesionError
from skinlesion.inference.options import ScoringOptions

BACKENDS = ("torch", "onnx")


class Backend(Protocol):
    name: str
    meta: dict[str, Any]
    classes: list[str]
    preprocessing: Preprocessing

    def view_logits(self, batch: torch.Tensor, n_views: int = 1) -> np.ndarray: ...


def load_backend(source: str | Path, backend: str = "torch", device: str = "cpu") -> Backend:
    """The torch (best.pt) or ONNX Runtime (model.onnx) backend of a run folder or file."""
    if backend == "torch":
        from skinlesion.inference.torch_backend import TorchBackend

        return TorchBackend(source, device=device)
    if backend == "onnx":
        from skinlesion.inference.onnx_backend import OnnxBackend

        return OnnxBackend(source)
    raise SkinLesionError(f"unknown backend {backend!r}; choose {' or '.join(BACKENDS)}")


@dataclass(frozen=True)
class Classifier:
    backend: Backend
    chain: DecisionChain

    @classmethod
    def load(cls, source: str | Path, backend: str = "torch", device: str = "cpu") -> Classifier:
        loaded = load_backend(source, backend, device)
        return cls(loaded, DecisionChain.from_meta(loaded.meta))

    @property
    def classes(self) -> list[str]:
        return list(self.chain.classes)

    @property
    def class_names(self) -> dict[str, str]:
        """Each class code's full name (the run's label set; HAM10000's for runs made before it was stored)."""
        stored = self.backend.meta.get("class_names") or {}
        return {c: stored.get(c) or FULL_NAMES.get(c, c) for c in self.classes}

    @property
    def preprocessing(self) -> Preprocessing:
        return self.backend.preprocessing

    def with_chain(self, **changes: Any) -> Classifier:
        """The same network with some chain settings changed (a step switched off, other TTA views)."""
        return replace(self, chain=self.chain.replace(**changes))

    def switched(self, *switches: Any) -> Classifier:
        """The same network with the command line's switches applied to its chain (DecisionChain.switched)."""
        return replace(self, chain=self.chain.switched(*switches))

    def n_views(self, tta: bool) -> int:
        return self.chain.tta_views if tta else 1

    def decode(self, source: Source, **limits: Any) -> Image.Image:
        """An image file or upload decoded by the run's preprocessing (``limits``: open_rgb's max_pixels /
        max_aspect): a large photo is decoded small."""
        return self.preprocessing.open(source, **limits)

    def view_logits(self, images: Sequence[Source], tta: bool = False) -> np.ndarray:
        """Raw logits (V, N, C) of images (PIL images or files): V = 1, or the run's TTA views."""
        return self.backend.view_logits(self.preprocessing.batch(images), self.n_views(tta))

    def predict(
        self,
        images: Sequence[Source],
        tta: bool = False,
        clinical: pd.DataFrame | None = None,
        lesion_ids: Sequence[str | None] | None = None,
    ) -> Decisions:
        """Probabilities and decisions of images (PIL images or files); ``clinical`` (row i = images[i]: age, sex,
        localization) for the metadata prior, ``lesion_ids`` for lesion pooling."""
        return self.chain(self.view_logits(images, tta), self.chain.offsets(clinical), lesion_ids)

    @property
    def safeguards(self) -> Safeguards:
        """The run's referral rule, conformal sets and out-of-distribution detector (the chain's sibling)."""
        guards = Safeguards.from_meta(self.backend.meta)
        if guards.needs_features and not hasattr(self.backend, "features"):
            raise SkinLesionError(f"the run's out-of-distribution check reads pooled features, which the "
                                  f"{self.backend.name} backend does not give; use the torch backend")  # fmt: skip
        return guards

    def assess(
        self,
        images: Sequence[Source],
        tta: bool = False,
        clinical: pd.DataFrame | None = None,
        lesion_ids: Sequence[str | None] | None = None,
    ) -> tuple[Decisions, Guarded]:
        """``predict`` and, beside it, the run's safeguards: refer or not (and why), the conformal label set, out of
        distribution or not (such an image gets no diagnosis)."""
        batch = self.preprocessing.batch(images)
        views = self.backend.view_logits(batch, self.n_views(tta))
        features = self.backend.features(batch) if self.safeguards.needs_features else None
        decided = self.chain(views, self.chain.offsets(clinical), lesion_ids)
        return decided, self.safeguards(decided, views[0], features)

    def predict_files(
        self,
        paths: Sequence[str | Path],
        batch_size: int = 32,
        tta: bool = False,
        clinical: pd.DataFrame | None = None,
        lesion_ids: Sequence[str | None] | None = None,
        top_k: int = 3,
        progress: bool = False,
    ) -> pd.DataFrame:
        """One row per file, in order: ``image``, ``p_<class>`` (calibrated), ``prediction`` (the chain's decision),
        ``prediction_name``, ``top_k`` (classes by probability, ';'-joined) and ``error``: a file that cannot be read
        is a row with its error and no probabilities, not a failed call. ``clinical`` / ``lesion_ids``: row i for
        paths[i] (metadata prior, lesion pooling across the whole call)."""
        paths = [Path(p) for p in paths]
        errors: dict[int, str] = {}
        read: list[int] = []
        chunks: list[np.ndarray] = []
        features: list[np.ndarray] = []
        guards = self.safeguards
        with tqdm(total=len(paths), desc="predict", unit="img", file=sys.stderr, disable=not progress) as bar:
            for rows, images in self._decoded_batches(paths, batch_size, errors, bar):
                batch = self.preprocessing.batch(images)
                chunks.append(self.backend.view_logits(batch, self.n_views(tta)))
                features += [self.backend.features(batch)] if guards.needs_features else []
                read += rows
        frame = pd.DataFrame({"image": [str(p) for p in paths]})
        for c in self.classes:
            frame[f"p_{c}"] = np.nan
        frame["prediction"] = frame["prediction_name"] = frame["top_k"] = None
        frame["error"] = [errors.get(i) for i in range(len(paths))]
        if lesion_ids is not None:
            frame["lesion_id"] = list(lesion_ids)
        if not read:
            return frame
        table = None if clinical is None else clinical.iloc[read].reset_index(drop=True)
        ids = None if lesion_ids is None else [lesion_ids[i] for i in read]
        views = np.concatenate(chunks, axis=1)
        decided = self.chain(views, self.chain.offsets(table), ids)
        self._fill(frame, read, decided, top_k)
        if guards.any:
            guarded = guards(decided, views[0], np.concatenate(features) if features else None)
            self._fill_guards(frame, read, guarded)
        return frame

    def _decoded_batches(
        self, paths: Sequence[Path], batch_size: int, errors: dict[int, str], bar: tqdm
    ) -> Iterator[tuple[list[int], list[Image.Image]]]:
        rows: list[int] = []
        images: list[Image.Image] = []
        for i, path in enumerate(paths):
            try:
                images.append(self.decode(path))
                rows.append(i)
            except SkinLesionError as e:
                errors[i] = str(e)
            bar.update(1)
            if len(images) == batch_size:
                yield rows, images
                rows, images = [], []
        if images:
            yield rows, images

    def _fill(self, frame: pd.DataFrame, rows: list[int], decided: Decisions, top_k: int) -> None:
        classes = self.classes
        frame.loc[rows, [f"p_{c}" for c in classes]] = decided.probabilities
        frame.loc[rows, "prediction"] = decided.names
        frame.loc[rows, "prediction_name"] = [self.class_names[n] for n in decided.names]
        order = np.argsort(-decided.probabilities, axis=1, kind="stable")[:, :top_k]
        frame.loc[rows, "top_k"] = [";".join(classes[k] for k in row) for row in order]

    def features_of_table(self, table: pd.DataFrame, options: ScoringOptions | None = None, desc: str = "features"
                          ) -> np.ndarray:  # fmt: skip
        """Pooled features (N, D) of every row of a data table (single view), for the out-of-distribution detector."""
        if not hasattr(self.backend, "features"):
            raise SkinLesionError(f"the {self.backend.name} backend gives no pooled features; use the torch backend")
        return np.concatenate([self.backend.features(x) for x, _ in tqdm(self._loader(table, options), desc=desc,
                                                                           unit="batch", leave=False)])  # fmt: skip

    def _loader(self, table: pd.DataFrame, options: ScoringOptions | None) -> DataLoader:
        """Batches of uint8 centre crops of a table's rows, from the preprocessing's cache or the files."""
        from skinlesion.data.cache import ImageCache

        options = options or ScoringOptions()
        cache = ImageCache.open_or_build(table, self.preprocessing, options.cache_dir) if options.cache else None
        dataset = LesionDataset(table, self.preprocessing, self.preprocessing.eval_transform(), cache,
                                self.classes)  # fmt: skip
        pin = getattr(self.backend, "device", torch.device("cpu")).type == "cuda"  # page-locked: faster copies
        return DataLoader(dataset, batch_size=options.batch_size, shuffle=False, num_workers=options.workers,
                          pin_memory=pin)  # fmt: skip

    def _fill_guards(self, frame: pd.DataFrame, rows: list[int], guarded: Guarded) -> None:
        """The safeguards' columns; an out-of-distribution image keeps its probabilities but gets no diagnosis."""
        frame["refer"] = frame["refer_reason"] = frame["prediction_set"] = None
        frame["out_of_distribution"] = frame["ood_score"] = None
        frame.loc[rows, "refer"] = guarded.refer
        frame.loc[rows, "refer_reason"] = guarded.reasons
        frame.loc[rows, "out_of_distribution"] = guarded.out_of_distribution
        if guarded.sets is not None:
            frame.loc[rows, "prediction_set"] = [";".join(guarded.set_of(i, tuple(self.classes)))
                                                 for i in range(len(rows))]  # fmt: skip
        if guarded.ood_scores is not None:
            frame.loc[rows, "ood_score"] = guarded.ood_scores
        outside = [r for r, o in zip(rows, guarded.out_of_distribution, strict=True) if o]
        frame.loc[outside, "prediction"] = None
        frame.loc[outside, "prediction_name"] = "no diagnosis: out of distribution"

    def view_logits_of_table(
        self, table: pd.DataFrame, n_views: int = 1, options: ScoringOptions | None = None, desc: str = "predict"
    ) -> np.ndarray:
        """Raw logits (n_views, N, C) of every row of a data table (``path`` column), in one pass: view 0 is the
        single-view logit, the mean over all the TTA one. Pixels come from the preprocessing's image cache
        (``options.cache``, built on first use) or from decoding the files: the same either way."""
        loader = self._loader(table, options)
        chunks = [self.backend.view_logits(x, n_views) for x, _ in tqdm(loader, desc=desc, unit="batch", leave=False)]
        return np.concatenate(chunks, axis=1)
