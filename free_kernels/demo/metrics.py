"""Offline quality metrics for the demo's generated digits.

Two numbers, both from the shipped digit classifier (:mod:`.classifier`):

* **Frechet distance (FD)** between Gaussians fitted to classifier features
  (the penultimate layer) -- the FID recipe with a small MNIST network in
  place of Inception.  ``digit_quality`` measures samples against reference
  statistics of the real MNIST digits (``reference_stats``, shipped as a small
  .npz so no data is needed at sampling time); ``fd_between`` compares two
  sample sets directly (e.g. baseline sampler vs FREE).
* **Accuracy**: how often the classifier reads a class-conditional sample as
  the digit it was asked for, overall and per class.

Caveat -- FD is biased upwards, and the bias depends on the sample count:
the sample mean and covariance of n draws scatter around the true ones, and
that scatter adds a positive, roughly 1/n, term (two sets of n *real* digits
have FD > 0).  Only compare FDs computed with the same n (and the same
reference statistics); for "is FREE lossless?" compare baseline and FREE runs
of equal size, ideally several seeds each, rather than reading an absolute value.
"""
from __future__ import annotations

import os
import warnings
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from . import ASSETS
from .classifier import DigitClassifier, extract, load_classifier

REFERENCE_FILE = os.path.join(ASSETS, "digit_reference_stats.npz")

ArrayLike = Union[np.ndarray, torch.Tensor, Sequence]
Stats = Tuple[np.ndarray, np.ndarray]


def _np64(a: ArrayLike) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().double().numpy()
    return np.asarray(a, dtype=np.float64)


def feature_stats(feats: ArrayLike) -> Stats:
    """(mean (F,), covariance (F, F)) of features (N, F), in float64 (unbiased covariance, N >= 2)."""
    f = _np64(feats)
    if f.ndim != 2:
        raise ValueError(f"features must be (N, F), got shape {f.shape}")
    if f.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {f.shape[0]}")
    return f.mean(axis=0), np.cov(f, rowvar=False, ddof=1).reshape(f.shape[1], f.shape[1])


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix (negative round-off clipped)."""
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def _trace_sqrt_product_eigh(s1: np.ndarray, s2: np.ndarray) -> float:
    """tr sqrt(s1 s2) for symmetric PSD s1, s2, without a general (non-symmetric) matrix square root.

    With r = s1^(1/2), the product s1 s2 = r (r s2) has the same non-zero
    eigenvalues as (r s2) r = r s2 r, which is symmetric PSD; sqrt(s1 s2) has
    the square roots of those eigenvalues, so its trace is the sum of them.
    Everything stays real: no imaginary round-off to discard.
    """
    r = _psd_sqrt(s1)
    m = r @ s2 @ r
    w = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(w, 0.0, None)).sum())


def _trace_sqrt_product_scipy(s1: np.ndarray, s2: np.ndarray, eps: float = 1e-6) -> float:
    """tr sqrt(s1 s2) via scipy.linalg.sqrtm (the pytorch-fid recipe), for cross-checking the eigh path."""
    try:
        from scipy import linalg
    except ImportError as e:  # scipy is only a test extra
        raise ImportError("method='sqrtm' needs scipy (pip install scipy); the default method='eigh' does not") from e
    covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():  # singular product: nudge both diagonals
        off = np.eye(s1.shape[0]) * eps
        covmean = linalg.sqrtm((s1 + off) @ (s2 + off))
    if np.iscomplexobj(covmean):
        imag = np.abs(np.diagonal(covmean).imag).max()
        if imag > 1e-3 * max(1.0, float(np.abs(np.diagonal(covmean).real).max())):
            warnings.warn(f"sqrtm left an imaginary part of {imag:.3g} on the diagonal; using the eigh method")
            return _trace_sqrt_product_eigh(s1, s2)
        covmean = covmean.real  # tiny imaginary parts are round-off
    return float(np.trace(covmean))


def frechet_distance_from_stats(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike,
                                method: str = "eigh") -> float:
    """|mu1 - mu2|^2 + tr(s1) + tr(s2) - 2 tr sqrt(s1 s2): the squared 2-Wasserstein (Frechet)
    distance between N(mu1, s1) and N(mu2, s2).  ``method``: "eigh" (default, numpy only) or
    "sqrtm" (scipy).  Clipped at 0 against round-off."""
    mu1, mu2 = _np64(mu1).ravel(), _np64(mu2).ravel()
    s1, s2 = np.atleast_2d(_np64(sigma1)), np.atleast_2d(_np64(sigma2))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"mismatched statistics: means {mu1.shape} / {mu2.shape}, "
                         f"covariances {s1.shape} / {s2.shape}")
    if method == "eigh":
        tr_covmean = _trace_sqrt_product_eigh(s1, s2)
    elif method == "sqrtm":
        tr_covmean = _trace_sqrt_product_scipy(s1, s2)
    else:
        raise ValueError(f"method must be 'eigh' or 'sqrtm', got {method!r}")
    diff = mu1 - mu2
    fd = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)
    return max(fd, 0.0)


def frechet_distance(feats_a: ArrayLike, feats_b: ArrayLike, method: str = "eigh") -> float:
    """Frechet distance between Gaussians fitted to two feature sets (N_a, F) and (N_b, F)."""
    return frechet_distance_from_stats(*feature_stats(feats_a), *feature_stats(feats_b), method=method)


# ---------------------------------------------------------------------------------------------
# reference statistics of the real digits

_MEMO: Dict[str, Tuple[np.ndarray, np.ndarray, int]] = {}


def _classifier(classifier: Optional[DigitClassifier]) -> DigitClassifier:
    return load_classifier() if classifier is None else classifier


def _images(x: ArrayLike) -> torch.Tensor:
    """(N, 1, H, W) float images in [-1, 1]; uint8 input (0..255, e.g. ``data.to_uint8``) is rescaled."""
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(np.asarray(x))
    x = x.detach()
    if x.dim() == 3:  # (N, H, W) -> (N, 1, H, W)
        x = x.unsqueeze(1)
    if x.dtype == torch.uint8:
        return x.float() / 127.5 - 1.0
    return x.float()


def _labels(y: ArrayLike) -> torch.Tensor:
    if isinstance(y, torch.Tensor):
        return y.detach().cpu().long().ravel()
    return torch.as_tensor(np.asarray(y)).long().ravel()


def reference_stats(classifier: Optional[DigitClassifier] = None, cache: Optional[str] = REFERENCE_FILE,
                    data: Optional[str] = None, recompute: bool = False) -> Tuple[np.ndarray, np.ndarray, int]:
    """(mean, covariance, n) of the classifier's features over the real MNIST digits (t10k, 16x16).

    Read from ``cache`` (an .npz; the shipped one sits in the assets directory)
    when it was made with this very classifier (same weight fingerprint);
    otherwise computed from the MNIST files (``data`` or the default
    locations, see :func:`.data.find_mnist`) and written to ``cache``.  The
    shipped cache is never overwritten with another classifier's statistics:
    for a different classifier pass your own ``cache`` path (or None).
    """
    model = _classifier(classifier)
    fp = model.fingerprint()
    if not recompute and fp in _MEMO:
        return _MEMO[fp]
    if cache and not recompute and os.path.isfile(cache):
        with np.load(cache) as z:
            if str(z["fingerprint"]) == fp:
                _MEMO[fp] = (z["mu"].astype(np.float64), z["sigma"].astype(np.float64), int(z["n"]))
                return _MEMO[fp]
        if os.path.abspath(cache) == os.path.abspath(REFERENCE_FILE):
            cache = None  # stale for this classifier: compute, but leave the shipped file alone
    from .data import load_mnist

    x, _ = load_mnist(data, size=model.input_size)
    feats, _ = extract(model, x)
    mu, sigma = feature_stats(feats)
    if cache:
        os.makedirs(os.path.dirname(os.path.abspath(cache)), exist_ok=True)
        tmp = cache + ".tmp.npz"
        np.savez(tmp, mu=mu, sigma=sigma, n=np.int64(x.shape[0]), fingerprint=np.str_(fp),
                 description=np.str_(f"digit classifier features over the MNIST t10k digits "
                                     f"({x.shape[0]}, {model.input_size}x{model.input_size}, [-1, 1])"))
        os.replace(tmp, cache)
    _MEMO[fp] = (mu, sigma, int(x.shape[0]))
    return _MEMO[fp]


# ---------------------------------------------------------------------------------------------
# sample-level metrics


def digit_quality(samples: ArrayLike, labels: Optional[ArrayLike] = None,
                  classifier: Optional[DigitClassifier] = None, ref: Optional[Tuple] = None,
                  batch_size: int = 1000, method: str = "eigh") -> dict:
    """Quality of generated digits ``samples`` (N, 1, 16, 16) in [-1, 1] (clamped; uint8 0..255 also
    accepted) that were asked to be ``labels`` (N,).

    Returns ``fd`` (vs the real-digit reference statistics, or ``ref`` =
    (mu, sigma[, n])), ``accuracy`` (fraction classified as their label),
    ``per_class_accuracy`` (10 entries, None for a class with no samples),
    ``per_class_n``, ``mean_confidence`` (mean max softmax probability), ``n``
    and ``ref_n``.  With ``labels=None`` the accuracy fields are None.
    FD depends on n: compare only equal-sized runs (see the module docstring).
    """
    model = _classifier(classifier)
    x = _images(samples)
    n = int(x.shape[0])
    if n < 2:
        raise ValueError(f"need at least 2 samples, got {n}")
    feats, logits = extract(model, x, batch_size=batch_size)
    if ref is None:
        ref = reference_stats(model)
    mu_r, sigma_r = ref[0], ref[1]
    ref_n = int(ref[2]) if len(ref) > 2 else None
    fd = frechet_distance_from_stats(*feature_stats(feats), mu_r, sigma_r, method=method)
    probs = logits.softmax(1)
    out = dict(fd=fd, accuracy=None, per_class_accuracy=None, per_class_n=None,
               mean_confidence=float(probs.max(1).values.mean()), n=n, ref_n=ref_n)
    if labels is not None:
        y = _labels(labels)
        if y.numel() != n:
            raise ValueError(f"{y.numel()} labels for {n} samples")
        correct = logits.argmax(1) == y
        out["accuracy"] = float(correct.float().mean())
        out["per_class_n"] = [int((y == c).sum()) for c in range(model.num_classes)]
        out["per_class_accuracy"] = [float(correct[y == c].float().mean()) if k else None
                                     for c, k in enumerate(out["per_class_n"])]
    return out


def fd_between(samples_a: ArrayLike, samples_b: ArrayLike, classifier: Optional[DigitClassifier] = None,
               batch_size: int = 1000, method: str = "eigh") -> float:
    """FD between two image sets (e.g. baseline vs FREE samples) in the classifier's feature space.

    Same caveat: the value depends on both set sizes; compare like with like.
    """
    model = _classifier(classifier)
    fa, _ = extract(model, _images(samples_a), batch_size=batch_size)
    fb, _ = extract(model, _images(samples_b), batch_size=batch_size)
    return frechet_distance(fa, fb, method=method)
