"""fastrepa.eval: Fréchet distance, streaming stats, IS, precision/recall, FID Inception, CLI.

The real FID Inception weights cannot be downloaded here: the network tests save random weights
with the official key names and load them back strict through the same loader.
"""
import json

import numpy as np
import pytest
import torch
from scipy import linalg

from fastrepa.eval import (EvalInputError, FeatureAccumulator, FIDInceptionV3, NpzImages, ReferenceFile,
                           RunningStats, compute_activations, extract_features, frechet_distance,
                           image_features, inception_score, load_inception, manifold_radii,
                           precision_recall)
from fastrepa.eval.cli import METRIC_KEYS, cli
from fastrepa.eval.cli import main as eval_main
from fastrepa.eval.inception import FID_WEIGHTS_URL, features_id, file_sha256, tf_legacy_resize_bilinear

# ---------------------------------------------------------------- Fréchet distance


def _rand_spd(rng, d):
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
def test_frechet_identity_covariance(method):
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.standard_normal(16), rng.standard_normal(16)
    eye = np.eye(16)
    got = frechet_distance(mu1, eye, mu2, eye, method=method)
    assert got == pytest.approx(np.sum((mu1 - mu2) ** 2), rel=1e-10, abs=1e-10)


@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
def test_frechet_diagonal_covariances(method):
    rng = np.random.default_rng(1)
    a, b = rng.uniform(0.1, 3, 12), rng.uniform(0.1, 3, 12)
    mu1, mu2 = rng.standard_normal(12), rng.standard_normal(12)
    want = np.sum((np.sqrt(a) - np.sqrt(b)) ** 2) + np.sum((mu1 - mu2) ** 2)
    got = frechet_distance(mu1, np.diag(a), mu2, np.diag(b), method=method)
    assert got == pytest.approx(want, rel=1e-9)


def test_frechet_random_spd_against_independent_formula():
    rng = np.random.default_rng(2)
    d = 20
    s1, s2 = _rand_spd(rng, d), _rand_spd(rng, d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    # Independent: Tr sqrt(S1 S2) = Tr sqrt(S1^1/2 S2 S1^1/2), with sqrtm of symmetric matrices.
    r1 = linalg.sqrtm(s1).real
    want = (np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2)
            - 2 * np.trace(linalg.sqrtm(r1 @ s2 @ r1).real))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-9)
    assert frechet_distance(mu1, s1, mu2, s2, method="eigh") == pytest.approx(want, rel=1e-9)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0, abs=1e-9)


def test_frechet_shape_mismatch():
    with pytest.raises(ValueError, match="mean vectors"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# ---------------------------------------------------------------- streaming statistics


def test_running_stats_matches_numpy():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((103, 7)) * 3 + 1000.0  # a large offset: the shifted sums must cope
    rs = RunningStats()
    for i in range(0, len(x), 10):
        rs.update(torch.from_numpy(x[i:i + 10]).float() if i == 0 else x[i:i + 10])
    x[:10] = torch.from_numpy(x[:10]).float().double().numpy()  # first batch went in as float32
    np.testing.assert_allclose(rs.mu, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(rs.sigma, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-9)
    assert rs.n == 103


def test_running_stats_errors():
    rs = RunningStats()
    with pytest.raises(ValueError, match="no features"):
        rs.mu
    rs.update(np.zeros((1, 4)))
    with pytest.raises(ValueError, match="at least 2"):
        rs.sigma
    with pytest.raises(ValueError, match="dimension 5"):
        rs.update(np.zeros((2, 5)))


# ---------------------------------------------------------------- Inception Score


def test_inception_score_hand_cases():
    assert inception_score(np.full((10, 8), 1 / 8)) == pytest.approx(1.0)
    k = 5
    onehot = np.eye(k)[np.arange(20) % k]  # every class equally often, each prediction certain
    assert inception_score(onehot) == pytest.approx(k)
    # logits: equal logits are uniform -> 1; split size cuts the set into chunks (mean of chunks).
    assert inception_score(np.zeros((6, 3)), from_logits=True) == pytest.approx(1.0)
    two = np.eye(2)[[0, 0, 1, 1]]  # split_size=2: each chunk holds one class only -> 1 each
    assert inception_score(two, split_size=2) == pytest.approx(1.0)
    assert inception_score(two, split_size=4) == pytest.approx(2.0)


def test_inception_score_from_logits_matches_softmax():
    rng = np.random.default_rng(4)
    logits = rng.standard_normal((50, 10)) * 3
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    marg = p.mean(0)
    want = np.exp(np.mean(np.sum(p * (np.log(p) - np.log(marg)), 1)))
    assert inception_score(logits) == pytest.approx(want, rel=1e-10)
    assert inception_score(p) == pytest.approx(want, rel=1e-10)


# ---------------------------------------------------------------- precision / recall


def test_precision_recall_identical_and_far():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((40, 8)).astype(np.float32)
    assert precision_recall(x, x.copy()) == (1.0, 1.0)
    assert precision_recall(x, x + 1000) == (0.0, 0.0)


def test_precision_recall_1d_by_hand():
    # real on a line at 0..4: 3rd-NN squared radii are 9,4,4,4,9 (from the ends / the middle).
    real = np.arange(5, dtype=np.float32)[:, None]
    np.testing.assert_allclose(manifold_radii(real, k=3).numpy(), [9, 4, 4, 4, 9])
    # fake: 0.5 and 6.9 lie inside a real ball (|6.9-4|^2 = 8.41 <= 9); 7.5 and 20 do not.
    fake = np.array([[0.5], [6.9], [7.5], [20.0]], dtype=np.float32)
    # fake radii (k=3, squared): 0.5->(20-0.5)^2, 6.9->(20-6.9)^2, 7.5->(20-7.5)^2, 20->19.5^2.
    # Every real point is within 19.5 of fake 0.5 -> recall 1.
    p, r = precision_recall(real, fake, k=3)
    assert p == pytest.approx(0.5) and r == pytest.approx(1.0)


def test_precision_recall_2d_by_hand_and_chunking():
    # real: unit square corners; k=1 radius of each corner is 1 (squared 1).
    real = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=np.float32)
    # fake: two points next to a corner, two far away; k=1 radii: 0.01 pair and 1 pair (squared).
    fake = np.array([[0, 0.1], [0, 0], [5, 5], [5, 6]], dtype=np.float32)
    # precision: [0,.1] and [0,0] inside; [5,5],[5,6] are 32+ away -> 0.5.
    # recall: real [0,0] is inside fake [0,0]'s ball (r^2=.01); [0,1] is .81 from [0,.1] > .01 -> out.
    # the far fakes have r^2 = 1 and no real point within 1 of them -> recall 0.25.
    for chunk in (1, 3, 100):
        p, r = precision_recall(real, fake, k=1, chunk=chunk)
        assert (p, r) == (pytest.approx(0.5), pytest.approx(0.25))


def test_precision_recall_needs_more_than_k_points():
    with pytest.raises(ValueError, match="k=3"):
        precision_recall(np.zeros((3, 2)), np.zeros((10, 2)))


# ---------------------------------------------------------------- FID Inception network


def _signal_preserving_weights(seed=0):
    """Random weights that keep activations O(1) through 90+ layers (He init, identity BN)."""
    torch.manual_seed(seed)
    m = FIDInceptionV3()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(mod.weight, nonlinearity="relu")
            elif isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.normal_(0, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
                mod.bias.normal_(0, 0.1)
        m.fc.weight.normal_(0, 0.05)
    return m.state_dict()


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("inc") / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(_signal_preserving_weights(), path)
    return path


@pytest.fixture(scope="module")
def inception(inception_file):
    return load_inception(inception_file)


def test_inception_state_dict_keys_are_official_layout(inception_file):
    sd = torch.load(inception_file, weights_only=True)
    assert sd["fc.weight"].shape == (1008, 2048) and "AuxLogits.fc.weight" not in sd
    for k in ("Conv2d_1a_3x3.conv.weight", "Mixed_5b.branch_pool.bn.running_var",
              "Mixed_6d.branch1x1.conv.weight", "Mixed_7c.branch3x3dbl_3b.bn.weight"):
        assert k in sd
    # torchvision's Inception-v3 layout (what the published file was saved from) has the same keys.
    from torchvision.models.inception import Inception3
    tv = Inception3(num_classes=1008, aux_logits=False, init_weights=False).state_dict()
    assert set(sd) == set(tv) and all(sd[k].shape == tv[k].shape for k in tv)


def test_inception_loads_strict_and_is_deterministic(inception, inception_file, tmp_path):
    # a file without num_batches_tracked (older torch) still loads; a wrong key does not.
    sd = torch.load(inception_file, weights_only=True)
    slim = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    torch.save(slim, tmp_path / "slim.pth")
    load_inception(tmp_path / "slim.pth")
    bad = dict(sd)
    bad["extra.weight"] = bad.pop("fc.bias")
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(RuntimeError, match=r"missing keys \['fc.bias'\].*extra.weight"):
        load_inception(tmp_path / "bad.pth")

    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (2, 48, 40, 3), dtype=torch.uint8, generator=g)
    a = extract_features(inception, imgs)
    assert a.pool.shape == (2, 2048) and a.spatial.shape == (2, 2023) and a.logits.shape == (2, 1008)
    assert a.pool.std() > 1e-3 and a.spatial.std() > 1e-3  # signal survived the network
    assert torch.isfinite(a.pool).all() and torch.isfinite(a.logits).all()
    # NCHW input, swapped batch: same features, swapped.
    b = extract_features(inception, imgs.flip(0).permute(0, 3, 1, 2))
    for x, y in ((a.pool, b.pool), (a.spatial, b.spatial), (a.logits, b.logits)):
        torch.testing.assert_close(x.flip(0), y, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(a.pool[0], a.pool[1])
    # logits are pool @ W^T without the bias, as ADM's softmax graph.
    torch.testing.assert_close(a.logits, a.pool @ inception.fc.weight.t(), rtol=1e-5, atol=1e-6)


def test_inception_input_errors(inception):
    with pytest.raises(TypeError, match="uint8"):
        extract_features(inception, torch.zeros(1, 8, 8, 3))
    with pytest.raises(ValueError, match=r"\[N,H,W,3\]"):
        extract_features(inception, torch.zeros(1, 8, 8, 4, dtype=torch.uint8))


def test_features_in_chunks_accumulate_to_compute_activations(inception):
    """generate.py's path (image_features per shard, FeatureAccumulator in index order) gives what
    compute_activations of the whole array gives: same preprocessing, same per-image features."""
    imgs = np.random.default_rng(7).integers(0, 256, (3, 20, 20, 3), dtype=np.uint8)
    whole = compute_activations(inception, [imgs])
    acc = FeatureAccumulator()
    for a, b in ((0, 1), (1, 3)):  # other "shards", other network batches
        f = image_features(inception, torch.from_numpy(imgs[a:b]), batch_size=1)
        assert {k: v.shape for k, v in f.items()} == {"pool": (b - a, 2048), "spatial": (b - a, 2023),
                                                      "logits": (b - a, 1008)}
        acc.add(f["pool"], f["spatial"], f["logits"])
    got = acc.result()
    np.testing.assert_allclose(got.pool, whole.pool, rtol=1e-5, atol=1e-6)
    # logits are 2048-long fp32 dot products of the pool features: a different network batch size
    # may sum them in another order, so allow fp32 round-off at the logits' own scale
    np.testing.assert_allclose(got.logits, whole.logits, rtol=1e-5, atol=2e-6 * np.abs(whole.logits).max())
    for s_got, s_want in ((got.pool_stats, whole.pool_stats), (got.spatial_stats, whole.spatial_stats)):
        assert s_got.n == s_want.n == 3
        np.testing.assert_allclose(s_got.mu, s_want.mu, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(s_got.sigma, s_want.sigma, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match=r"'spatial' features are float32 \(2, 2023\), expected float \[3, 2023\]"):
        acc.add(np.zeros((3, 2048), np.float32), np.zeros((2, 2023), np.float32), np.zeros((3, 1008), np.float32))
    with pytest.raises(ValueError, match="no images"):
        FeatureAccumulator().result()


def test_inception_runs_fp32_under_autocast(inception):
    imgs = torch.from_numpy(np.random.default_rng(8).integers(0, 256, (1, 16, 16, 3), dtype=np.uint8))
    plain = extract_features(inception, imgs)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as around generate.py's sampler
        auto = extract_features(inception, imgs)
    assert auto.pool.dtype == torch.float32
    torch.testing.assert_close(auto.pool, plain.pool, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(auto.spatial, plain.spatial, rtol=1e-6, atol=1e-6)


def test_missing_weights_error(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        load_inception(tmp_path / "nope.pth")
    assert str(tmp_path / "nope.pth") in str(e.value) and FID_WEIGHTS_URL in str(e.value)


# ---------------------------------------------------------------- preprocessing (ADM's TF way, pytorch-fid's)


def _tf_legacy_resize_loops(img, out_h, out_w):
    """TF1 ResizeBilinear (align_corners=False, half_pixel_centers=False) by its formula, one output pixel
    at a time in float32 scalars: the oracle of the vectorised version."""
    f32 = np.float32
    in_h, in_w = img.shape

    def tap(o, n_in, n_out):
        src = f32(o) * (f32(n_in) / f32(n_out))
        lo = int(np.floor(src))
        return lo, min(lo + 1, n_in - 1), f32(src - f32(lo))

    out = np.empty((out_h, out_w), f32)
    for oy in range(out_h):
        y0, y1, yl = tap(oy, in_h, out_h)
        for ox in range(out_w):
            x0, x1, xl = tap(ox, in_w, out_w)
            top = img[y0, x0] + (img[y0, x1] - img[y0, x0]) * xl
            bottom = img[y1, x0] + (img[y1, x1] - img[y1, x0]) * xl
            out[oy, ox] = top + (bottom - top) * yl
    return out


@pytest.mark.parametrize("shape", [(7, 5, 11, 9), (1, 256, 1, 299), (256, 2, 299, 3), (9, 8, 4, 3)])
def test_tf_legacy_resize_matches_the_formula(shape):
    in_h, in_w, out_h, out_w = shape
    x = torch.from_numpy(np.random.default_rng(in_h * in_w).uniform(0, 255, (2, 3, in_h, in_w)).astype(np.float32))
    got = tf_legacy_resize_bilinear(x, (out_h, out_w))  # batched NCHW, every channel on its own
    assert got.shape == (2, 3, out_h, out_w) and got.dtype == torch.float32
    for n in range(2):
        for c in range(3):
            want = _tf_legacy_resize_loops(x[n, c].numpy(), out_h, out_w)
            np.testing.assert_allclose(got[n, c].numpy(), want, rtol=1e-6, atol=1e-4)


def test_tf_legacy_resize_by_hand_and_identity():
    # in = 0, 0.5, 1.0, 1.5: the last two clamp to the last pixel (no half-pixel centres)
    assert tf_legacy_resize_bilinear(torch.tensor([[[0.0, 10.0]]]), (1, 4)).tolist() == [[[0, 5, 10, 10]]]
    x = torch.randint(0, 256, (2, 3, 6, 5), dtype=torch.uint8)
    same = tf_legacy_resize_bilinear(x, (6, 5))
    assert same.dtype == torch.float32 and torch.equal(same, x.float())
    # not PyTorch's half-pixel bilinear: that one gives 0, 2.5, 7.5, 10
    half = torch.nn.functional.interpolate(torch.tensor([[[[0.0, 10.0]]]]), size=(1, 4), mode="bilinear",
                                           align_corners=False)
    assert half.flatten().tolist() == [0, 2.5, 7.5, 10]


def test_preprocess_modes_normalise_as_their_sources():
    tf, pt = FIDInceptionV3(), FIDInceptionV3(preprocess="pytorch-fid")
    assert tf.preprocess_mode == "tf"  # the default: ADM's
    for hw in (299, 20):  # at the network size and resized: constants stay constants
        for value, want_tf, want_pt in ((128, 0.0, 128 / 127.5 - 1), (0, -1.0, -1.0), (255, 127 / 128, 1.0)):
            img = torch.full((1, hw, hw, 3), value, dtype=torch.uint8)
            got_tf, got_pt = tf.preprocess(img), pt.preprocess(img)
            assert got_tf.shape == got_pt.shape == (1, 3, 299, 299)
            assert torch.equal(got_tf, torch.full_like(got_tf, want_tf)), (hw, value)
            torch.testing.assert_close(got_pt, torch.full_like(got_pt, want_pt), rtol=0, atol=1e-6)
    img = torch.randint(0, 256, (2, 17, 13, 3), dtype=torch.uint8)
    want = (tf_legacy_resize_bilinear(img.permute(0, 3, 1, 2).float(), (299, 299)) - 128) / 128
    torch.testing.assert_close(tf.preprocess(img), want, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"one of \('tf', 'pytorch-fid'\), got 'adm'"):
        FIDInceptionV3(preprocess="adm")


def test_preprocess_modes_give_different_features_and_ids(inception, inception_file):
    pt = load_inception(inception_file, preprocess="pytorch-fid")
    imgs = torch.from_numpy(np.random.default_rng(11).integers(0, 256, (2, 24, 24, 3), dtype=np.uint8))
    a, b = extract_features(inception, imgs), extract_features(pt, imgs)
    assert (a.pool - b.pool).abs().max() > 1e-3 * a.pool.abs().max()
    sha = file_sha256(inception_file)
    # pytorch-fid keeps the bare sha256 (what earlier versions tagged their features with); tf does not
    assert features_id(sha, "pytorch-fid") == sha and features_id(sha, "tf") == sha + "+tf"


# ---------------------------------------------------------------- npz readers and the CLI


def _images(n, seed, hw=(32, 32)):
    return np.random.default_rng(seed).integers(0, 256, (n, *hw, 3), dtype=np.uint8)


def test_samples_npz_validation(tmp_path):
    p = tmp_path / "s.npz"
    np.savez(p, arr_0=_images(4, 0).astype(np.float32))
    with pytest.raises(EvalInputError, match=r"s\.npz.*dtype float32.*uint8"):
        NpzImages(p)
    np.savez(p, arr_0=_images(4, 0)[..., :2].copy())
    with pytest.raises(EvalInputError, match=r"shape \(4, 32, 32, 2\).*\[N, H, W, 3\]"):
        NpzImages(p)
    np.savez(p, images=_images(4, 0))
    with pytest.raises(EvalInputError, match=r"no 'arr_0'.*\['images'\]"):
        NpzImages(p)
    (tmp_path / "x.npz").write_bytes(b"not a zip")
    with pytest.raises(EvalInputError, match="not an .npz"):
        NpzImages(tmp_path / "x.npz")
    with pytest.raises(EvalInputError, match="not found"):
        NpzImages(tmp_path / "missing.npz")
    # streaming reads give back exactly the array, compressed or not, in uneven batches
    x = _images(7, 1)
    np.savez_compressed(p, arr_0=x)
    np.testing.assert_array_equal(np.concatenate(list(NpzImages(p).iter_batches(3))), x)


def test_reference_validation(tmp_path):
    p = tmp_path / "ref.npz"
    np.savez(p, arr_1=np.zeros(3))
    with pytest.raises(EvalInputError, match=r"ref\.npz.*neither FID statistics.*nor images"):
        ReferenceFile(p)
    np.savez(p, mu=np.zeros(2048), sigma=np.eye(2048), mu_s=np.zeros(2023))
    with pytest.raises(EvalInputError, match=r"'mu_s' without 'sigma_s'"):
        ReferenceFile(p)
    np.savez(p, mu_s=np.zeros(2023), sigma_s=np.eye(2023))
    with pytest.raises(EvalInputError, match=r"neither FID statistics \('mu', 'sigma'"):
        ReferenceFile(p)
    np.savez(p, arr_0=_images(1, 0))
    with pytest.raises(EvalInputError, match=r"ref\.npz: 1 reference image; FID statistics need at least 2"):
        ReferenceFile(p)
    with pytest.raises(EvalInputError, match="folder"):
        ReferenceFile(p, center_crop=32)
    np.savez(p, mu=np.zeros(2048), sigma=np.eye(2048), mu_s=np.zeros(7), sigma_s=np.eye(7))
    with pytest.raises(EvalInputError, match=r"'mu_s' has shape \(7,\)"):
        ReferenceFile(p)


def test_cli_end_to_end(inception_file, tmp_path, capsys):
    samples, ref = tmp_path / "samples.npz", tmp_path / "ref.npz"
    np.savez(samples, arr_0=_images(4, 0))
    np.savez(ref, arr_0=_images(4, 0))  # the same images: FID ~ 0
    out = tmp_path / "report.json"
    args = [str(samples), "--ref", str(ref), "--inception", str(inception_file),
            "--batch-size", "3", "--device", "cpu", "--out", str(out), "--fd-method", "eigh"]
    rep = eval_main(args)
    on_disk = json.loads(out.read_text())
    assert set(on_disk) >= {"fid", "sfid", "inception_score", "precision", "recall", "settings"}
    assert on_disk["settings"]["num_samples"] == 4
    assert on_disk["settings"]["inception_weights"] == str(inception_file.resolve())
    # "~0" relative to the scale of the features: rep4 below (other images) is O(trace(sigma)).
    assert abs(rep["fid"]) < 1e-3 and abs(rep["sfid"]) < 1e-3
    assert rep["precision"] == 1.0 and rep["recall"] == 1.0
    assert rep["inception_score"] >= 1.0
    assert rep["settings"]["reference_stats_source"] == "computed"
    caches = list(tmp_path.glob("ref.npz.*.fastrepa-stats.npz"))
    assert len(caches) == 1
    # second run reads the cache
    rep2 = eval_main(args, quiet=True)
    assert rep2["settings"]["reference_stats_source"].startswith("cache:")
    assert rep2["fid"] == pytest.approx(rep["fid"], abs=1e-9)

    # a reference with statistics only: FID from the file's mu/sigma, no precision/recall.
    with np.load(caches[0]) as c:
        np.savez(tmp_path / "stats.npz", **{k: c[k] for k in ("mu", "sigma", "mu_s", "sigma_s")})
    other = tmp_path / "other.npz"
    np.savez(other, arr_0=_images(4, 9))
    rep3 = eval_main([str(samples), "--ref", str(tmp_path / "stats.npz"), "--inception",
                      str(inception_file), "--fd-method", "eigh"], quiet=True)
    assert rep3["settings"]["reference_stats_source"] == "file"
    assert rep3["precision"] is None and rep3["recall"] is None
    assert rep3["fid"] == pytest.approx(rep["fid"], abs=1e-6)
    rep4 = eval_main([str(other), "--ref", str(tmp_path / "stats.npz"), "--inception",
                      str(inception_file), "--fd-method", "eigh"], quiet=True)
    assert rep4["fid"] > 1e-2  # different images are measurably apart
    print("fid same/other:", rep["fid"], rep4["fid"], "sfid:", rep["sfid"], rep4["sfid"])


def test_preprocess_modes_never_share_caches_or_stored_features(inception, inception_file, tmp_path):
    """Reference statistics cached, and pool features stored by make-ref, under one preprocessing are not
    used under the other: each mode has its own cache (pytorch-fid's under the bare sha256, the name of
    earlier versions), and make-ref's features carry the mode."""
    np.savez(tmp_path / "ref.npz", arr_0=_images(5, 3))
    ref, sha = ReferenceFile(tmp_path / "ref.npz"), file_sha256(inception_file)
    nets = {"tf": inception, "pytorch-fid": load_inception(inception_file, preprocess="pytorch-fid")}
    stats = {}
    for mode in ("tf", "pytorch-fid", "tf", "pytorch-fid"):
        got = ref.stats(nets[mode], features_id(sha, mode), batch_size=5)
        cache = tmp_path / f"ref.npz.{sha[:12]}{'+tf' if mode == 'tf' else ''}.fastrepa-stats.npz"
        assert got.source == ("computed" if mode not in stats else f"cache:{cache}"), (mode, got.source)
        stats.setdefault(mode, got)
        np.testing.assert_array_equal(got.pool, stats[mode].pool)
    assert len(list(tmp_path.glob("ref.npz.*.fastrepa-stats.npz"))) == 2
    assert np.abs(stats["tf"].mu - stats["pytorch-fid"].mu).max() > 1e-3 * np.abs(stats["tf"].mu).max()

    # the CLI: the flag picks the cache, and the report says which preprocessing it used
    np.savez(tmp_path / "samples.npz", arr_0=_images(4, 0))
    base = [str(tmp_path / "samples.npz"), "--ref", str(tmp_path / "ref.npz"), "--inception", str(inception_file),
            "--fd-method", "eigh"]
    rep = eval_main([*base, "--inception-preprocess", "pytorch-fid"], quiet=True)
    assert rep["settings"]["inception_preprocess"] == "pytorch-fid" and rep["settings"]["inception_sha256"] == sha
    assert rep["settings"]["reference_stats_source"].endswith(f"{sha[:12]}.fastrepa-stats.npz")
    made = tmp_path / "made.npz"  # the default (tf): its pool features are named sha256+tf
    out = eval_main(["make-ref", str(tmp_path / "ref.npz"), "--out", str(made), "--inception", str(inception_file)],
                    quiet=True)
    assert out["inception_preprocess"] == "tf" and str(np.load(made)["inception_sha256"]) == sha + "+tf"
    for mode, usable in (("tf", True), ("pytorch-fid", False)):
        got = ReferenceFile(made).stats(None, features_id(sha, mode))
        assert (got.pool is not None) == usable, mode
    assert any("+tf" in n and "not these" in n for n in got.notes)


def test_cli_bad_inputs_fail_before_loading_weights(tmp_path):
    samples = tmp_path / "samples.npz"
    np.savez(samples, arr_0=_images(2, 0).astype(np.float64))
    np.savez(tmp_path / "ref.npz", arr_0=_images(4, 0))
    with pytest.raises(EvalInputError, match="samples.npz.*float64"):
        eval_main([str(samples), "--ref", str(tmp_path / "ref.npz"), "--inception", "/nonexistent"])
    np.savez(samples, arr_0=_images(2, 0))
    with pytest.raises(FileNotFoundError, match="/nonexistent"):
        eval_main([str(samples), "--ref", str(tmp_path / "ref.npz"), "--inception", "/nonexistent"])


def test_partial_reference_scores_fid_and_reports_sfid_unavailable(inception_file, tmp_path):
    """mu/sigma without mu_s/sigma_s: FID from the file, sFID None with a note; with arr_0 in the file
    too, the spatial statistics come from its images."""
    samples, full = tmp_path / "samples.npz", tmp_path / "full.npz"
    np.savez(samples, arr_0=_images(4, 0))
    np.savez(full, arr_0=_images(5, 3))
    base = ["--inception", str(inception_file), "--fd-method", "eigh", "--batch-size", "5"]
    want = eval_main([str(samples), "--ref", str(full), *base], quiet=True)
    [cache] = tmp_path.glob("full.npz.*.fastrepa-stats.npz")
    with np.load(cache) as c:
        stats = {k: c[k] for k in ("mu", "sigma", "mu_s", "sigma_s")}
    np.savez(tmp_path / "pool_only.npz", mu=stats["mu"], sigma=stats["sigma"])
    rep = eval_main([str(samples), "--ref", str(tmp_path / "pool_only.npz"), *base], quiet=True)
    assert rep["fid"] == pytest.approx(want["fid"], rel=1e-9) and rep["sfid"] is None
    assert rep["precision"] is None and rep["inception_score"] == pytest.approx(want["inception_score"])
    assert any("sFID unavailable" in n and "pool_only.npz" in n for n in rep["notes"])
    # the same statistics beside the images: sFID (and P/R) from the images, FID from the file
    np.savez(tmp_path / "with_images.npz", arr_0=_images(5, 3), mu=stats["mu"], sigma=stats["sigma"])
    rep2 = eval_main([str(samples), "--ref", str(tmp_path / "with_images.npz"), *base], quiet=True)
    for k in ("fid", "sfid", "precision", "recall"):
        assert rep2[k] == pytest.approx(want[k], rel=1e-9), k
    assert rep2["settings"]["reference_stats_source"].startswith("file (mu, sigma) and computed")


def _write_folder(folder, images, ext=".png"):
    """Images i as folder/<i % 2>/img<i>.ext: nested, and listed in sorted relative-path order."""
    from PIL import Image
    order = []
    for i, im in enumerate(images):
        rel = f"{i % 2}/img{i}{ext}"
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).save(folder / rel)
        order.append(rel)
    return [int(r.split("img")[1].split(".")[0]) for r in sorted(order)]


def test_folder_reference_equals_the_npz_of_its_images_and_make_ref(inception_file, tmp_path):
    imgs = _images(5, 4)
    folder = tmp_path / "real"
    order = _write_folder(folder, imgs)
    (folder / "notes.txt").write_text("not an image")
    np.savez(tmp_path / "ref.npz", arr_0=imgs[order])  # the same images in the folder's (sorted) order
    np.savez(tmp_path / "samples.npz", arr_0=_images(4, 0))
    base = ["--inception", str(inception_file), "--fd-method", "eigh", "--batch-size", "3", "--device", "cpu"]
    npz = eval_main([str(tmp_path / "samples.npz"), "--ref", str(tmp_path / "ref.npz"), *base], quiet=True)
    rep = eval_main([str(tmp_path / "samples.npz"), "--ref", str(folder), *base], quiet=True)
    assert rep["settings"]["num_reference_images"] == 5 and rep["settings"]["reference_stats_source"] == "computed"
    for k in METRIC_KEYS:
        assert rep[k] == pytest.approx(npz[k], rel=1e-12), k
    [cache] = tmp_path.glob("real.*.fastrepa-stats.npz")
    with np.load(cache) as c, np.load(next(tmp_path.glob("ref.npz.*.fastrepa-stats.npz"))) as n:
        for k in ("mu", "sigma", "mu_s", "sigma_s", "pool"):
            np.testing.assert_array_equal(c[k], n[k])
    rep = eval_main([str(tmp_path / "samples.npz"), "--ref", str(folder), *base], quiet=True)
    assert rep["settings"]["reference_stats_source"] == f"cache:{cache}"
    # an image changed (size, mtime): the cache no longer applies
    from PIL import Image
    Image.fromarray(_images(1, 9)[0]).save(folder / "1" / "img1.png")
    rep = eval_main([str(tmp_path / "samples.npz"), "--ref", str(folder), *base], quiet=True)
    assert rep["settings"]["reference_stats_source"] == "computed" and rep["fid"] != pytest.approx(npz["fid"])
    Image.fromarray(imgs[1]).save(folder / "1" / "img1.png")

    # make-ref: the statistics and pool features as an ADM-format .npz, which scores as the folder does
    made = eval_main(["make-ref", str(folder), "--out", str(tmp_path / "made" / "ref.npz"), *base[:2], *base[4:]],
                     quiet=True)
    assert made["num_images"] == 5 and made["source"] == "computed"
    with np.load(tmp_path / "made" / "ref.npz") as z:
        assert set(z.files) == {"mu", "sigma", "mu_s", "sigma_s", "pool", "inception_sha256"}
        assert z["pool"].shape == (5, 2048)
    rep = eval_main([str(tmp_path / "samples.npz"), "--ref", str(tmp_path / "made" / "ref.npz"), *base], quiet=True)
    assert rep["settings"]["reference_stats_source"] == "file"
    for k in METRIC_KEYS:
        assert rep[k] == pytest.approx(npz[k], rel=1e-12), k
    # other Inception weights: the stored pool features do not apply (FID still does)
    other = tmp_path / "other.pth"
    torch.save(_signal_preserving_weights(seed=1), other)
    rep = eval_main([str(tmp_path / "samples.npz"), "--ref", str(tmp_path / "made" / "ref.npz"), "--inception",
                     str(other), "--fd-method", "eigh"], quiet=True)
    assert rep["precision"] is None and any("not these" in n for n in rep["notes"])


def test_folder_reference_center_crop_and_errors(inception_file, tmp_path):
    from fastrepa.data.center_crop import center_crop_arr
    big = [_images(1, 10 + i, hw=(40 + 8 * i, 70))[0] for i in range(3)]  # other sizes, not square
    folder = tmp_path / "big"
    order = _write_folder(folder, big, ext=".jpg")
    from PIL import Image
    decoded = [np.asarray(Image.open(folder / f"{i % 2}/img{i}.jpg").convert("RGB")) for i in order]
    np.savez(tmp_path / "cropped.npz", arr_0=np.stack([center_crop_arr(im, 32) for im in decoded]))
    np.savez(tmp_path / "samples.npz", arr_0=_images(4, 0))
    base = ["--inception", str(inception_file), "--fd-method", "eigh", "--no-cache"]
    want = eval_main([str(tmp_path / "samples.npz"), "--ref", str(tmp_path / "cropped.npz"), *base], quiet=True)
    got = eval_main([str(tmp_path / "samples.npz"), "--ref", str(folder), "--ref-center-crop", *base], quiet=True)
    assert got["fid"] == pytest.approx(want["fid"], rel=1e-12) and got["sfid"] == pytest.approx(want["sfid"], rel=1e-12)
    with pytest.raises(EvalInputError, match=r"0/img2\.jpg: image is 70x56, .*0/img0\.jpg is 70x40.*--ref-center-crop"):
        eval_main([str(tmp_path / "samples.npz"), "--ref", str(folder), *base], quiet=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvalInputError, match="empty: reference folder holds no images"):
        ReferenceFile(tmp_path / "empty")
    (folder / "0" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(EvalInputError, match=r"broken\.png: cannot read"):
        eval_main([str(tmp_path / "samples.npz"), "--ref", str(folder), "--ref-center-crop", *base], quiet=True)


def test_cli_small_n_is_a_clean_error_or_partial(inception_file, tmp_path, capsys):
    np.savez(tmp_path / "one.npz", arr_0=_images(1, 0))
    np.savez(tmp_path / "three.npz", arr_0=_images(3, 1))
    np.savez(tmp_path / "ref.npz", arr_0=_images(5, 2))
    base = ["--inception", str(inception_file), "--fd-method", "eigh"]
    with pytest.raises(SystemExit) as e:
        cli([str(tmp_path / "one.npz"), "--ref", str(tmp_path / "ref.npz"), *base])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "one.npz: 1 sample; FID needs at least 2" in err and "Traceback" not in err
    # 3 samples: FID, sFID and IS; precision/recall (k=3) need more than 3 a side -> None and a note
    rep = eval_main([str(tmp_path / "three.npz"), "--ref", str(tmp_path / "ref.npz"), *base], quiet=True)
    assert np.isfinite(rep["fid"]) and np.isfinite(rep["sfid"]) and rep["precision"] is None and rep["recall"] is None
    assert any("need more than 3 images a side; have 3 samples and 5 reference images" in n for n in rep["notes"])
