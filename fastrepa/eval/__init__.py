"""ADM evaluation metrics (FID, sFID, IS, precision, recall) from a local FID Inception file.

``python -m fastrepa.eval samples.npz --ref REF [--inception PATH]`` (REF: an ADM .npz or a folder of
images) and ``python -m fastrepa.eval make-ref FOLDER --out REF.npz``; see cli.py.
"""
from .features import (FEATURE_KEYS, Activations, FeatureAccumulator, check_features, compute_activations,
                       image_features)
from .inception import (FID_WEIGHTS_NAME, FID_WEIGHTS_URL, PREPROCESS_MODES, FIDInceptionV3,
                        InceptionFeatures, default_weights_path, extract_features, features_id, file_sha256,
                        find_weights, load_inception, tf_legacy_resize_bilinear)
from .metrics import (RunningStats, frechet_distance, inception_score, inside_manifold,
                      manifold_radii, precision_recall)
from .reference import EvalInputError, FolderImages, NpzImages, ReferenceFile, ReferenceStats

__all__ = [
    "FEATURE_KEYS", "Activations", "FeatureAccumulator", "check_features", "compute_activations",
    "image_features", "FID_WEIGHTS_NAME", "FID_WEIGHTS_URL", "PREPROCESS_MODES", "FIDInceptionV3",
    "InceptionFeatures", "default_weights_path", "extract_features", "features_id", "file_sha256",
    "find_weights", "load_inception", "tf_legacy_resize_bilinear", "RunningStats", "frechet_distance",
    "inception_score", "inside_manifold", "manifold_radii", "precision_recall", "EvalInputError",
    "FolderImages", "NpzImages", "ReferenceFile", "ReferenceStats",
]
