"""The demo's offline quality metrics: Frechet distance maths, the shipped digit classifier, digit_quality."""
import json
import os
import shutil

import numpy as np
import pytest
import torch

from free_kernels.demo import CLASSIFIER_FILE
from free_kernels.demo.classifier import DigitClassifier, load_classifier
from free_kernels.demo.metrics import (REFERENCE_FILE, digit_quality, fd_between, feature_stats,
                                       frechet_distance, frechet_distance_from_stats, reference_stats)


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # leave the other core to whatever trains in the background
    yield
    torch.set_num_threads(old)


def _random_spd(rng, d):
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def _diag_closed_form(mu_a, var_a, mu_b, var_b):
    # N(mu_a, diag var_a) vs N(mu_b, diag var_b): |dmu|^2 + sum (sqrt(var_a) - sqrt(var_b))^2
    return float(np.sum((mu_a - mu_b) ** 2) + np.sum((np.sqrt(var_a) - np.sqrt(var_b)) ** 2))


# ---------------------------------------------------------------------------------------------
# Frechet distance maths (no data, no classifier)


def test_identical_gaussians_give_zero():
    rng = np.random.default_rng(0)
    for d in (1, 5, 64):
        mu, s = rng.standard_normal(d), _random_spd(rng, d)
        assert frechet_distance_from_stats(mu, s, mu, s) == pytest.approx(0.0, abs=1e-9 * d)


def test_singular_covariances():
    # rank-deficient covariances (dead ReLU features) must not break the square root
    rng = np.random.default_rng(1)
    a = rng.standard_normal((8, 3))
    s = a @ a.T
    assert frechet_distance_from_stats(np.zeros(8), s, np.zeros(8), s) == pytest.approx(0.0, abs=1e-8)
    z = np.zeros((8, 8))
    assert frechet_distance_from_stats(np.zeros(8), z, np.ones(8), z) == pytest.approx(8.0)


def test_diagonal_closed_form():
    rng = np.random.default_rng(2)
    for d in (1, 4, 32):
        mu_a, mu_b = rng.standard_normal(d), rng.standard_normal(d)
        var_a, var_b = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
        want = _diag_closed_form(mu_a, var_a, mu_b, var_b)
        got = frechet_distance_from_stats(mu_a, np.diag(var_a), mu_b, np.diag(var_b))
        assert got == pytest.approx(want, rel=1e-10, abs=1e-10)
        # a pure shift with equal covariances is exactly |mu_a - mu_b|^2
        shift = frechet_distance_from_stats(mu_a, np.diag(var_a), mu_b, np.diag(var_a))
        assert shift == pytest.approx(float(np.sum((mu_a - mu_b) ** 2)), rel=1e-10, abs=1e-10)
        # rotating both Gaussians by the same orthogonal matrix changes nothing
        q, _ = np.linalg.qr(rng.standard_normal((d, d)))
        rot = frechet_distance_from_stats(q @ mu_a, q @ np.diag(var_a) @ q.T, q @ mu_b, q @ np.diag(var_b) @ q.T)
        assert rot == pytest.approx(want, rel=1e-8, abs=1e-9)


def test_symmetric_and_non_negative():
    rng = np.random.default_rng(3)
    for _ in range(5):
        d = 16
        fa = rng.standard_normal((300, d)) @ rng.standard_normal((d, d))
        fb = rng.standard_normal((200, d)) @ rng.standard_normal((d, d)) + rng.standard_normal(d)
        ab, ba = frechet_distance(fa, fb), frechet_distance(fb, fa)
        assert ab >= 0 and ba >= 0
        assert ab == pytest.approx(ba, rel=1e-9)
        assert frechet_distance(fa, fa) == pytest.approx(0.0, abs=1e-7)


def test_sampled_features_match_closed_form():
    rng = np.random.default_rng(4)
    d, n = 4, 200_000
    mu_a, mu_b = np.zeros(d), np.array([1.0, -0.5, 0.0, 2.0])
    var_a, var_b = np.array([1.0, 2.0, 0.5, 1.0]), np.array([1.0, 0.5, 0.5, 4.0])
    fa = mu_a + rng.standard_normal((n, d)) * np.sqrt(var_a)
    fb = mu_b + rng.standard_normal((n, d)) * np.sqrt(var_b)
    want = _diag_closed_form(mu_a, var_a, mu_b, var_b)
    assert frechet_distance(fa, fb) == pytest.approx(want, rel=0.02)
    assert frechet_distance(torch.from_numpy(fa).float(), torch.from_numpy(fb).float()) == pytest.approx(want, rel=0.02)
    mu, sigma = feature_stats(fa)
    assert mu.dtype == np.float64 and sigma.shape == (d, d)


def test_eigh_matches_scipy_sqrtm():
    pytest.importorskip("scipy", reason="scipy (a test extra) is needed for the sqrtm cross-check")
    rng = np.random.default_rng(5)
    for d in (2, 10, 64):
        m1, m2 = rng.standard_normal(d), rng.standard_normal(d)
        s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
        a = frechet_distance_from_stats(m1, s1, m2, s2, method="eigh")
        b = frechet_distance_from_stats(m1, s1, m2, s2, method="sqrtm")
        assert a == pytest.approx(b, rel=1e-7, abs=1e-9)


def test_bad_inputs():
    with pytest.raises(ValueError, match="mismatched"):
        frechet_distance_from_stats(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(np.zeros((1, 3)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match="method"):
        frechet_distance_from_stats(np.zeros(2), np.eye(2), np.zeros(2), np.eye(2), method="nope")


# ---------------------------------------------------------------------------------------------
# the shipped classifier and reference statistics (no data needed)


@pytest.fixture(scope="module")
def clf():
    if not os.path.isfile(CLASSIFIER_FILE):
        pytest.fail(f"the shipped digit classifier {CLASSIFIER_FILE} is missing")
    return load_classifier()


def test_classifier_shapes(clf):
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    with torch.no_grad():
        assert clf(x).shape == (3, 10)
        assert clf.features(x).shape == (3, clf.feature_dim)
    with pytest.raises(ValueError, match=r"\(N, 1, 16, 16\)"):
        clf(torch.zeros(2, 1, 32, 32))
    assert os.path.getsize(CLASSIFIER_FILE) < 1_000_000


def test_load_classifier_errors(tmp_path, clf):
    with pytest.raises(FileNotFoundError, match="train_classifier"):
        load_classifier(str(tmp_path / "nope.safetensors"))
    bad = tmp_path / "c.safetensors"
    shutil.copy(CLASSIFIER_FILE, bad)
    (tmp_path / "c.json").write_text(json.dumps({"config": {"feature_dim": clf.feature_dim + 1}}))
    with pytest.raises(ValueError, match="shape mismatches"):
        load_classifier(str(bad))
    (tmp_path / "c.json").write_text(json.dumps({"config": {"depth": 3}}))
    with pytest.raises(ValueError, match="unknown keys"):
        load_classifier(str(bad))


def test_shipped_reference_stats_match_classifier(clf):
    # the .npz is shipped so that sampling-time metrics need no MNIST files
    assert os.path.isfile(REFERENCE_FILE), f"{REFERENCE_FILE} is missing"
    with np.load(REFERENCE_FILE) as z:
        assert str(z["fingerprint"]) == clf.fingerprint(), "reference stats were made with another classifier"
    mu, sigma, n = reference_stats(clf)
    assert mu.shape == (clf.feature_dim,) and sigma.shape == (clf.feature_dim,) * 2 and n == 10000
    assert np.allclose(sigma, sigma.T)


def test_reference_stats_cache(tmp_path, monkeypatch):
    import free_kernels.demo.data as data
    import free_kernels.demo.metrics as metrics

    fake = torch.rand(50, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    monkeypatch.setattr(data, "load_mnist", lambda path=None, size=16: (fake, torch.zeros(50, dtype=torch.long)))
    with open(REFERENCE_FILE, "rb") as f:
        before = f.read()
    torch.manual_seed(0)
    other = DigitClassifier().eval()
    # another classifier: computed (here from the stand-in data), the shipped file left alone
    mu, sigma, n = reference_stats(other)
    assert n == 50 and mu.shape == (other.feature_dim,)
    with open(REFERENCE_FILE, "rb") as f:
        assert f.read() == before
    # an explicit cache is written, then read back without touching the data
    cache = str(tmp_path / "ref.npz")
    reference_stats(other, cache=cache, recompute=True)
    assert os.path.isfile(cache)
    metrics._MEMO.clear()
    monkeypatch.setattr(data, "load_mnist", lambda *a, **k: pytest.fail("cache hit expected, data was loaded"))
    mu2, sigma2, n2 = reference_stats(other, cache=cache)
    assert n2 == 50 and np.array_equal(mu, mu2) and np.array_equal(sigma, sigma2)
    metrics._MEMO.clear()


def test_digit_quality_fields(clf, monkeypatch):
    import free_kernels.demo.data as data
    import free_kernels.demo.metrics as metrics

    # sampling-time metrics need no MNIST files: the reference statistics come from the shipped .npz
    metrics._MEMO.clear()
    monkeypatch.setattr(data, "load_mnist", lambda *a, **k: pytest.fail("digit_quality must not load MNIST"))
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(64, 1, 16, 16, generator=g) * 2 - 1
    labels = torch.arange(64) % 10
    q = digit_quality(noise, labels, clf)
    assert set(q) >= {"fd", "accuracy", "per_class_accuracy", "per_class_n", "n", "mean_confidence", "ref_n"}
    assert q["n"] == 64 and q["ref_n"] == 10000
    assert len(q["per_class_accuracy"]) == 10 and q["per_class_n"] == [7, 7, 7, 7, 6, 6, 6, 6, 6, 6]
    assert 0.0 <= q["accuracy"] <= 1.0 and q["fd"] > 0
    q2 = digit_quality(noise[:20], None, clf)
    assert q2["accuracy"] is None and q2["per_class_accuracy"] is None and q2["n"] == 20
    q3 = digit_quality(noise[:10], torch.zeros(10, dtype=torch.long), clf)
    assert q3["per_class_accuracy"][1:] == [None] * 9
    with pytest.raises(ValueError, match="labels"):
        digit_quality(noise, labels[:5], clf)
    # uint8 images (as saved) and numpy inputs give the same numbers as float tensors
    from free_kernels.demo.data import to_uint8

    u8 = to_uint8(noise)
    q4 = digit_quality(u8.numpy(), labels.numpy(), clf)
    q5 = digit_quality(u8.float() / 127.5 - 1, labels, clf)
    assert q4["fd"] == pytest.approx(q5["fd"], rel=1e-6) and q4["accuracy"] == q5["accuracy"]


# ---------------------------------------------------------------------------------------------
# on real digits (skipped without the MNIST files)


@pytest.fixture(scope="module")
def mnist():
    from free_kernels.demo.data import find_mnist, load_mnist

    try:
        find_mnist()
    except FileNotFoundError as e:
        pytest.skip(f"MNIST data directory not found (set FREE_KERNELS_MNIST): {e}")
    return load_mnist(size=16)


def test_classifier_accuracy_on_real_digits(clf, mnist):
    x, y = mnist
    # 500 of the 1000 digits the training script held out (seeded permutation, see train_classifier.py)
    idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))[9000:9500]
    q = digit_quality(x[idx], y[idx], clf)
    assert q["accuracy"] > 0.95, q


def test_real_vs_real_small_noise_large(clf, mnist):
    x, y = mnist
    idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(1))[:2000]
    a, b = x[idx[:1000]], x[idx[1000:]]
    real_real = fd_between(a, b, clf)
    noise = torch.rand(1000, 1, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    noise_real = fd_between(noise, a, clf)
    assert real_real < 0.05 * noise_real, (real_real, noise_real)
    # against the shipped reference statistics: real digits close, noise far
    q_real, q_noise = digit_quality(a, y[idx[:1000]], clf), digit_quality(noise, y[idx[:1000]], clf)
    assert q_real["fd"] < 0.05 * q_noise["fd"], (q_real["fd"], q_noise["fd"])
    assert q_real["accuracy"] > 0.95 and q_noise["accuracy"] < 0.5
