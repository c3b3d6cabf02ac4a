"""The decision layer shared by a single PatchCore model and an ensemble of them.

A `Detector` owns the host stage (every input through `preprocess`, in batches, in input order), the
thresholds and the calibration that fix the score scale, and the colours of the maps. Subclasses
provide the device stage: `launch(crops)` on uint8 crops (returns the call that waits for
`(scores, maps)`), `config` (whose image geometry and `batch_size` the host stage uses),
`require_fitted()`, and `scale_low()` (the bottom of the colour scale). Long work reports through
`progress(stage, done, total)`, a callback; nothing here prints.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Iterator

import numpy as np

from patchcore_jax._src.model import preprocess
from patchcore_jax._src.stages import metrics

# Quantiles recorded by the calibrations (keyed by str(q) in `calibration`).
CALIBRATION_QUANTILES = (0.5, 0.9, 0.99, 0.999, 1.0)


@dataclasses.dataclass(frozen=True)
class Prediction:
    """One scored image: its name (file path or `images[i]`), the uint8 crop the model saw
    `(crop, crop, 3)`, the image score (Eq. 7), the anomaly map `(crop, crop)` float32, and the
    image's original `(height, width)` (see `PatchCore.frame_map`)."""

    name: str
    crop: np.ndarray
    score: float
    anomaly_map: np.ndarray
    size: tuple[int, int]


@dataclasses.dataclass(frozen=True)
class Threshold:
    """A decision threshold (scores strictly above it are anomalous) and the rule that set it."""

    value: float
    rule: str


@dataclasses.dataclass(frozen=True)
class Decision:
    """What the model says about one image, in one place, so the panel, `scores.csv` and the saved
    mask cannot disagree (see `Detector.decide`).

    Attributes:
      anomalous: True (image score strictly above the image threshold), False, or None (no image
        threshold set: no verdict).
      region: `(H, W)` bool, the pixels shown as defective; empty exactly when `anomalous` is False.
      level: the map level the region lies above (inclusive at the peak), or None when it is empty.
      rule: how the region was chosen, in words.
    """

    anomalous: bool | None
    region: np.ndarray
    level: float | None
    rule: str


class Detector:
    """Host stage, predictions and decisions; see the module docstring."""

    config = None  # set by subclasses
    progress = None  # a callback `progress(stage, done, total)`, or None

    def require_fitted(self) -> None:
        raise NotImplementedError

    def scale_low(self) -> float:
        raise NotImplementedError

    def launch(self, crops):
        """Starts scoring uint8 crops `(B, crop, crop, 3)` and returns the call that waits for
        `(scores (B,), maps (B, crop, crop))`."""
        raise NotImplementedError

    def finish_launches(self, error: BaseException | None = None) -> None:
        """Called once after the last `launch` of a prediction (with the error that ended it, if
        any). Where scoring is collective (a mesh over several processes) the device stage keeps
        taking part in the other processes' steps here; elsewhere it does nothing."""

    @property
    def collective(self) -> bool:
        """Whether scoring is a collective step with other processes (then a process may bring no images)."""
        return False

    def score_crops(self, crops) -> tuple[np.ndarray, np.ndarray]:
        """The device stage of `predict`: uint8 crops `(B, crop, crop, 3)` -> image scores `(B,)` and
        anomaly maps `(B, crop, crop)`, float32 host arrays."""
        return self.launch(crops)()

    def report(self, stage: str, done: int, total: int | None) -> None:
        """Passes progress to the `progress` callback, if any."""
        if callable(self.progress):
            self.progress(stage, done, total)

    # -- the host stage ----------------------------------------------------------------------------
    def prepare(self, image, *, name: str = "image") -> np.ndarray:
        """One image (file path, PIL image or array `(H, W[, C])`) -> the uint8 crop `(crop, crop, 3)`
        the model sees. Every input goes through here."""
        return self._prepare(image, name)[0]

    def _prepare(self, image, name: str) -> tuple[np.ndarray, tuple[int, int]]:
        cfg = self.config
        rgb = preprocess.load_image(image, name=name)
        crop = cfg.image_geometry.image(rgb, name=name)
        return crop, rgb.shape[:2]

    def crop_batches(self, images) -> Iterator[tuple[list[str], np.ndarray, list[tuple[int, int]]]]:
        """`(names, uint8 crops (b, crop, crop, 3), original sizes)` with `b <= batch_size`, in input
        order, prepared on a pool of threads (`preprocess.prepared_batches`)."""
        for batch in preprocess.prepared_batches(preprocess.iter_images(images), self._prepare, self.config.batch_size):
            names, done = zip(*batch)
            yield list(names), np.stack([c for c, _ in done]), [s for _, s in done]

    def frame_map(self, anomaly_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """A map `(crop, crop)` placed back into its image's original frame `size = (H, W)`: float32
        `(H, W)`, NaN where the model did not look (outside the centre crop)."""
        cfg = self.config
        return cfg.image_geometry.to_frame(anomaly_map, size)

    @staticmethod
    def count(images) -> int | None:
        """The number of images, where it is known before reading them (a progress total)."""
        sized = hasattr(images, "__len__") and not isinstance(images, (str, bytes, os.PathLike))
        return len(images) if sized else None

    # -- prediction --------------------------------------------------------------------------------
    def predict_iter(self, images) -> Iterator[Prediction]:
        """Scores images one batch at a time and yields a `Prediction` per image, in input order.

        The host reads and prepares the next batch while the device scores the current one (JAX
        dispatches asynchronously), so at most two batches are in flight."""
        self.require_fitted()

        def finish(names, crops, sizes, fetch):
            scores, maps = fetch()
            for i, name in enumerate(names):
                yield Prediction(name, crops[i], float(scores[i]), maps[i], tuple(int(v) for v in sizes[i]))

        batches = self.crop_batches(images)
        pending = None
        while True:
            try:
                names, crops, sizes = next(batches)
            except StopIteration:
                break
            except Exception as err:
                self.finish_launches(err)
                if pending is not None:  # an unreadable image: the batch already scored is yielded first
                    yield from finish(*pending)
                raise
            try:
                launched = (names, crops, sizes, self.launch(crops))
            except Exception as err:
                self.finish_launches(err)
                raise
            if pending is not None:
                yield from finish(*pending)
            pending = launched
        self.finish_launches()
        if pending is not None:
            yield from finish(*pending)

    def predict(self, images, *, frame: str = "crop") -> tuple[np.ndarray, np.ndarray | list[np.ndarray]]:
        """Image scores `(N,)` (Eq. 7) and anomaly maps, in input order.

        `frame="crop"`: maps `(N, crop, crop)` float32, as the model saw the images. `frame="original"`:
        a list of `(H_i, W_i)` float32 maps at each image's own size and geometry, NaN where the model
        did not look (outside the centre crop), so nothing near the border is cut away unseen.
        """
        if frame not in ("crop", "original"):
            raise ValueError(f"frame: expected 'crop' or 'original', got {frame!r}")
        self.require_fitted()
        scores, maps = [], []
        total = self.count(images)
        for pred in self.predict_iter(images):
            scores.append(pred.score)
            maps.append(pred.anomaly_map if frame == "crop" else self.frame_map(pred.anomaly_map, pred.size))
            self.report("scoring", len(scores), total)
        if not scores and self.collective:
            c = self.config.crop
            return np.zeros((0,), np.float32), (np.zeros((0, c, c), np.float32) if frame == "crop" else [])
        if not scores:
            where = f" in {os.fsdecode(images)}" if isinstance(images, (str, bytes, os.PathLike)) else ""
            raise ValueError(f"images: expected at least one test image{where}, got none")
        return np.asarray(scores, np.float32), (np.stack(maps) if frame == "crop" else maps)

    # -- decisions ---------------------------------------------------------------------------------
    @property
    def threshold(self) -> float | None:
        """The image-score decision threshold (None until set); scores strictly above are anomalous.
        Setting it directly records the rule "manual"."""
        return None if self.image_threshold is None else self.image_threshold.value

    @threshold.setter
    def threshold(self, value) -> None:
        value = check_threshold(value)
        self.image_threshold = None if value is None else Threshold(value, "manual")

    def fit_threshold(self, good_scores, *, quantile: float = 1.0, margin: float = 0.0) -> float:
        """Sets the image threshold from scores of held-out *good* images: their `quantile` (1.0 = the
        maximum, so every held-out good image passes), times `1 + margin`."""
        scores = np.asarray(good_scores, np.float64).ravel()
        if scores.size == 0 or not np.isfinite(scores).all():
            raise ValueError("good_scores: expected a non-empty array of finite scores")
        check_quantile(quantile)
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin) or margin <= -1:
            raise ValueError(f"margin: expected a finite number > -1, got {margin!r}")
        value = float(np.quantile(scores, quantile) * (1.0 + margin))
        self.image_threshold = Threshold(value, f"quantile {quantile:g} of {scores.size} held-out good image scores"
                                         + (f", times {1 + margin:g}" if margin else ""))
        return value

    def calibrate(self, good_images, *, quantile: float = 1.0) -> dict:
        """Held-out *good* images fix the scale: the image threshold is the `quantile` of their scores,
        the pixel threshold the `quantile` of their map values (1.0: every good image, and every good
        pixel, passes), and their score and map distributions are stored (`calibration["good_images"]`)."""
        check_quantile(quantile)
        scores, maps = self.predict(good_images)
        self.fit_threshold(scores, quantile=quantile)
        values = maps.ravel()
        pixel = float(np.quantile(values, quantile))
        self.pixel_threshold = Threshold(pixel, f"quantile {quantile:g} of the map values of {len(scores)} held-out good image{'s' if len(scores) != 1 else ''}")
        qs = (0.0,) + CALIBRATION_QUANTILES
        self.calibration["good_images"] = {
            "count": int(len(scores)),
            "image_score_quantiles": {str(q): float(np.quantile(scores, q)) for q in qs},
            "map_quantiles": {str(q): float(np.quantile(values, q)) for q in qs},
        }
        return {"image_threshold": self.threshold, "pixel_threshold": pixel, "images": int(len(scores))}

    def fit_calibrated(self, images, *, held_out: float = 0.2, quantile: float = 1.0) -> dict:
        """`fit` on every image, with thresholds that come from the training images themselves: a fold
        of `held_out` of them (at least one, spread evenly through the input order) is scored by a
        model fitted on the others, and `calibrate` sets the image and pixel thresholds from its scores
        and maps (their `quantile`); then the model is fitted again on all of them. Held-out good images
        (`calibrate`) or a labelled set (`calibrate_f1`) are better, when you have them.

        Fitting twice costs about `2 - held_out` fits. Returns what was done: `{"images", "held_out",
        "image_threshold", "pixel_threshold"}`, or `{"images", "held_out": 0}` when there are too few
        images to hold any out (then, as after `fit`, there is no image threshold)."""
        check_quantile(quantile)
        if isinstance(held_out, bool) or not isinstance(held_out, (int, float)) or not 0.0 <= held_out < 1.0:
            raise ValueError(f"held_out: expected a fraction in [0, 1), got {held_out!r}")
        items = [item for _, item in preprocess.iter_images(images)]
        n = len(items)
        k = max(1, int(round(held_out * n))) if held_out > 0 else 0
        if k == 0 or n - k < 1 or self.bank_size_for(n - k) < self.config.num_neighbors:
            self.fit(items)
            return {"images": n, "held_out": 0}
        fold = set(np.unique(np.linspace(0, n - 1, k).round().astype(int)).tolist())
        self.fit([x for i, x in enumerate(items) if i not in fold])
        self.calibrate([items[i] for i in sorted(fold)], quantile=quantile)
        image, pixel, good = self.image_threshold, self.pixel_threshold, self.calibration["good_images"]
        self.fit(items)
        how = (f"a fold of {k} of the {n} training images, scored by a model fitted on the other {n - k} "
               f"(the model kept is fitted on all {n})")
        self.image_threshold = Threshold(image.value, f"{image.rule}: {how}")
        self.pixel_threshold = Threshold(pixel.value, f"{pixel.rule}: {how}")
        self.calibration["good_images"] = good
        return {"images": n, "held_out": k, "image_threshold": image.value, "pixel_threshold": pixel.value}

    def calibrate_f1(self, images, labels, masks=None, *, mask_rule: str = "published") -> dict:
        """A labelled validation set sets the F1-optimal thresholds (anomalib's "adaptive" ones): the
        image threshold from `labels` `(N,)` (1 = anomalous), and, when `masks` are given (one `(H, W)`
        mask per image at its original size, uint8 0..255 or bool), the pixel threshold over all
        pixels of the crops. Returns precision, recall and F1 at each."""
        cfg = self.config
        labels = np.asarray(labels).ravel()
        scores, maps = self.predict(images)
        if len(labels) != len(scores):
            raise ValueError(f"labels: expected one label per image ({len(scores)}), got {len(labels)}")
        report = {"images": int(len(scores))}
        image = metrics.f1_optimal_threshold(labels, scores)
        self.image_threshold = Threshold(image["threshold"], f"F1-optimal on a validation set of {len(scores)} images "
                                                              f"(F1 {image['f1']:.3f})")
        report["image"] = image
        if masks is not None:
            if len(masks) != len(scores):
                raise ValueError(f"masks: expected one mask per image ({len(scores)}), got {len(masks)}")
            crops = np.stack([cfg.image_geometry.mask(m, rule=mask_rule, name=f"masks[{i}]") for i, m in enumerate(masks)])
            pixel = metrics.f1_optimal_threshold(crops, maps)
            self.pixel_threshold = Threshold(pixel["threshold"], f"F1-optimal over the pixels of a validation set of "
                                                                  f"{len(scores)} images (F1 {pixel['f1']:.3f})")
            report["pixel"] = pixel
        return report

    def classify(self, scores) -> np.ndarray:
        """Boolean labels (True = anomalous): score strictly above the image threshold."""
        if self.threshold is None:
            raise ValueError("threshold: not set; call calibrate(held-out good images) or fit_threshold(scores) first")
        return np.asarray(scores) > self.threshold

    def decide(self, score: float, anomaly_map: np.ndarray) -> Decision:
        """The one decision rule (panel title, `scores.csv`'s `anomalous` and the saved mask follow it):

        - the verdict is the image score against the image threshold (strictly above: anomalous);
        - an image judged fine shows no region, whatever its map;
        - an image judged anomalous shows where: the pixels whose map value is above the pixel threshold
          or, when none is (the image score and the blurred map can disagree), the peak of its map, the
          pixels above half way from the nominal level (`color_scale()[0]`) to the map's maximum;
        - without an image threshold there is no verdict, and the region is the pixels above the pixel
          threshold.
        NaN map values (outside the inspected crop) are never part of the region.

        DECISION: the image score decides, not the map, because the image score is the paper's
        (Eq. 7) and the one its thresholds (held-out, F1-optimal) are set on; the map only says where.
        """
        amap = np.asarray(anomaly_map, np.float64)
        finite = np.isfinite(amap)
        pixel = self.pixel_threshold.value
        if self.image_threshold is None:
            region = finite & (np.where(finite, amap, -np.inf) > pixel)
            return Decision(None, region, pixel if region.any() else None, "no image threshold: no verdict; the "
                            "region is the map above the pixel threshold")
        if not float(score) > self.image_threshold.value:
            return Decision(False, np.zeros(amap.shape, bool), None, "judged fine: no region")
        values = np.where(finite, amap, -np.inf)
        peak = float(values.max()) if finite.any() else -np.inf
        if peak > pixel:
            return Decision(True, values > pixel, pixel, "the map above the pixel threshold")
        low = self.scale_low()
        if peak > low:
            level = low + 0.5 * (peak - low)
            return Decision(True, values > level, level, "no pixel above the pixel threshold: the peak of the map "
                                                         "(above half way from the nominal level to its maximum)")
        return Decision(True, finite & (values >= peak), peak, "no pixel above the pixel threshold: the map's maximum")

    def color_scale(self) -> tuple[float, float, float]:
        """`(low, pixel threshold, high)` of the heatmap colours, fixed by the model: `low` is the median
        nominal patch score recorded at fit, the pixel threshold sits in the middle of the scale, and
        `high = 2 * threshold - low`. The same model gives the same colours in every run."""
        self.require_fitted()
        low = self.scale_low()
        mid = max(self.pixel_threshold.value, low + 1e-6)
        return low, mid, 2.0 * mid - low

    def normalized_scores(self, scores) -> np.ndarray | None:
        """Image scores on a scale read the same for every model: a linear map that puts the median
        held-out good score at 0, the image threshold at 0.5 and `threshold + (threshold - median)` at
        1. It is not clipped (so no information is lost): below 0 is more normal than the median good
        image, above 0.5 is anomalous, above 1 far beyond the threshold. None without a threshold.
        Without held-out good images the median is taken as 0 (a plain `0.5 * score / threshold`)."""
        if self.image_threshold is None:
            return None
        good = self.calibration.get("good_images")
        low = good["image_score_quantiles"]["0.5"] if good else 0.0
        t = self.image_threshold.value
        span = t - low if t > low else max(abs(t), 1e-12)
        return 0.5 + 0.5 * (np.asarray(scores, np.float64) - t) / span



def check_threshold(value) -> float | None:
    """None, or a finite real number (returned as float); ValueError otherwise."""
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not math.isfinite(float(value)):
        raise ValueError(f"threshold: expected a finite number or None, got {value!r}")
    return float(value)


def check_quantile(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"quantile: expected a number in [0, 1], got {value!r}")
    return float(value)
