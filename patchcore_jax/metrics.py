"""The evaluation metrics: image and pixel AUROC, AU-PRO (the MVTec AD procedure), F1-optimal thresholds."""

from patchcore_jax._src.stages.metrics import (  # noqa: F401 -- the public face
    area_under_curve,
    au_pro,
    f1_optimal_threshold,
    image_auroc,
    pixel_auroc,
    pro_curve,
    rates_at,
    roc_curve,
)

__all__ = ["area_under_curve", "au_pro", "f1_optimal_threshold", "image_auroc", "pixel_auroc", "pro_curve", "rates_at", "roc_curve"]
