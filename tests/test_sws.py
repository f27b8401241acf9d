"""Soft weight-sharing: the prior against torch.distributions, its chunked gradient, numerical
safety, its learnable state, and the quantization that follows it."""

from __future__ import annotations

import copy
import math
import shutil
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.distributions import Categorical, Gamma, MixtureSameFamily, Normal

from compaware import checkpoint, loop, native
from compaware.compress import Quantize, storage
from compaware.config import ScheduleConfig, UserError
from compaware.data import DataInfo, build_data
from compaware.loop import evaluate, make_optimizer
from compaware.mixture import Mixture
from compaware.models import build_model
from compaware.native import mixture as native_mixture
from compaware.regularizers import L2, SoftWeightSharing, sws
from compaware.regularizers.sws import (
    LOG_PRECISION_RANGE,
    _chunk_terms,
    _NegLogMixture,
    mixture_sums,
)
from compaware.train import train

INFO = DataInfo("synthetic", 1, 8, 10, train_size=1000)


@pytest.fixture
def native_kernels():
    """native_kernels=true for one test."""
    native.use(True)
    yield
    native.use(False)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 20), nn.ReLU(), nn.Linear(20, 10))


def _prior(model: nn.Module, **kwargs) -> SoftWeightSharing:
    prior = SoftWeightSharing(**{"components": 4, **kwargs})
    prior.setup(model, INFO)
    return prior


def test_negative_log_prior_matches_torch_distributions():
    model = _model()
    prior = _prior(model, chunk_size=100)  # several chunks
    with torch.no_grad():  # a mixture that is not the initial one
        prior.means.copy_(torch.tensor([-0.3, -0.1, 0.1, 0.2]))
        prior.log_precisions.copy_(torch.tensor([6.0, 3.0, 4.0, 5.0, 2.0]))
        prior.mixing_logits.copy_(torch.tensor([0.5, -1.0, 0.0, 2.0]))
    mixture = prior.mixture()
    weights = prior.flat_weights(model).detach()
    assert len(weights) == 64 * 20 + 20 + 20 * 10 + 10  # weights and biases
    mixture_nll = -MixtureSameFamily(Categorical(logits=mixture.log_pis),
                                     Normal(mixture.means, mixture.stds)).log_prob(weights).sum()
    alphas = torch.tensor([5000.0] + [250.0] * 4)
    betas = torch.tensor([2.0] + [0.1] * 4)
    gamma_nll = -Gamma(alphas, betas).log_prob(mixture.log_precisions.exp()).sum()
    constants = (torch.lgamma(alphas) - alphas * betas.log()).sum()  # dropped by the prior
    expected = mixture_nll + gamma_nll - constants
    got = prior.negative_log_prior(model)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-2)
    assert mixture.log_pis.exp()[0].item() == pytest.approx(0.99)
    assert prior.penalty(model).item() == pytest.approx(1.0 / len(weights) * got.item())


def test_strength_means_the_same_whatever_the_dataset_and_model_size():
    """lam weighs the mean −log p of a weight: twice the weights, each as likely, give the same
    penalty (with flat hyper-priors, whose few terms do not grow with the weights), and the
    dataset's size does not enter it."""
    narrow = _model()
    doubled = nn.Sequential(narrow, copy.deepcopy(narrow))  # twice the weights, each as likely
    other = DataInfo("synthetic", 1, 8, 10, train_size=50_000)
    flat = {"gamma_zero": [1.0, 1e-9], "gamma": [1.0, 1e-9], "init_std": 0.1}
    prior, twice, bigger_data = (SoftWeightSharing(components=4, init_range=[-0.3, 0.3], **flat)
                                 for _ in range(3))
    prior.setup(narrow, INFO)
    bigger_data.setup(narrow, other)
    twice.setup(doubled, INFO)
    assert bigger_data.penalty(narrow).item() == pytest.approx(prior.penalty(narrow).item())
    assert twice.penalty(doubled).item() == pytest.approx(prior.penalty(narrow).item(), rel=1e-5)


def test_the_strength_ramp_scales_the_prior():
    model = _model()
    prior = _prior(model)
    full = prior.penalty(model).item()
    prior.ramp = 0.25
    assert prior.penalty(model).item() == pytest.approx(0.25 * full)


def test_components_start_narrow_relative_to_the_weights():
    model = _model()
    prior = _prior(model)
    stds = prior.mixture().stds
    expected = sws.INIT_STD_SHARE * prior.flat_weights(model).detach().std()
    torch.testing.assert_close(stds, torch.full_like(stds, float(expected)), rtol=1e-5, atol=0)
    with torch.no_grad():  # the same network at ten times the scale: ten times the stds
        for p in model.parameters():
            p.mul_(10)
    assert _prior(model).mixture().stds[0].item() == pytest.approx(10 * stds[0].item())
    assert _prior(_model(), init_std=0.25).mixture().stds[3].item() == pytest.approx(0.25)


@pytest.mark.parametrize("far", [0.0, 40.0], ids=["near", "far"])
def test_chunked_gradient_is_the_exact_gradient(far):
    """``far``: some weights so far from every mean that all their terms underflow under the
    kernel's common shift; they are recomputed with their own (the textbook log-sum-exp)."""
    torch.manual_seed(0)
    w = torch.randn(50, dtype=torch.float64)
    w[::9] += far
    args = (w.requires_grad_(), torch.randn(5, dtype=torch.float64, requires_grad=True),
            torch.randn(5, dtype=torch.float64, requires_grad=True),
            torch.randn(5, dtype=torch.float64).log_softmax(0).requires_grad_())
    with torch.no_grad():
        smallest_total = _chunk_terms(w, args[1], args[2].exp(),
                                      args[3] + 0.5 * (args[2] - sws.LOG_2PI))[-1]
    assert (smallest_total < sws.UNDERFLOW) == bool(far)
    assert torch.autograd.gradcheck(
        lambda w, *mixture: _NegLogMixture.apply(*mixture, mixture_sums("eager", 7), w), args)


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler for the native kernel")
@pytest.mark.parametrize("far", [0.0, 40.0], ids=["near", "far"])
def test_native_kernel_gives_the_eager_sums(far, torch_threads, native_kernels):
    """float32 C kernel against the float64 torch one: blocks of 32 with a short last one,
    partial sums moved to double every 256 blocks, a block recomputed where a weight's terms
    all underflow, a tensor cut into pieces shared among threads, with the same sums on one
    thread as on three."""
    torch.manual_seed(0)
    w = torch.randn(2 * native_mixture.PIECE + 20_011) * 0.5
    w[::997] += far
    means = torch.randn(6)
    precisions = torch.rand(6) * 20 + 1
    log_norms = torch.randn(6).log_softmax(0) + 0.5 * (precisions.log() - sws.LOG_2PI)
    pieces = [w[:7], w[7:].reshape(4, -1)]  # two tensors, the second 2-D and in three pieces
    runs = []
    for threads in (1, 3):
        torch_threads(threads)
        runs.append(mixture_sums("compiled", 1 << 17)(pieces, means, precisions, log_norms))
    expected = mixture_sums("eager", 4096)([w.double()], *(t.double() for t in (
        means, precisions, log_norms)))
    assert native_mixture._kernel() is not None  # the C kernel ran, not its fallback
    (log_total, grads, *sums), (log_total_e, (grad_e,), *sums_e) = runs[0], expected
    assert [g.shape for g in grads] == [p.shape for p in pieces]
    grad = torch.cat([g.reshape(-1) for g in grads])
    for g, e in zip([log_total, grad, *sums], [log_total_e, grad_e, *sums_e], strict=True):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g.double(), e, rtol=1e-5, atol=1e-4)
    one_thread, three_threads = ([r[0], *r[1], *r[2:]] for r in runs)
    for a, b in zip(one_thread, three_threads, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(("kernel", "c_kernel"), [("compiled", False), ("eager", False),
                                                  ("compiled", True)],
                         ids=["compiled", "eager", "native"])
def test_weights_far_from_every_component_get_the_exact_prior(kernel, c_kernel, request):
    if c_kernel:
        request.getfixturevalue("native_kernels")
    model = _model()
    prior = _prior(model, kernel=kernel)
    with torch.no_grad():  # narrow components; three weights 50–100 σ from every mean
        prior.log_precisions.fill_(10.0)
        model[1].weight[0, :3] = torch.tensor([0.9, -0.8, 1.2])
    mixture = prior.mixture()
    weights = prior.flat_weights(model)
    expected = -MixtureSameFamily(Categorical(logits=mixture.log_pis),
                                  Normal(mixture.means, mixture.stds)).log_prob(weights).sum()
    (grad_expected,) = torch.autograd.grad(expected, model[1].weight)
    nll = _NegLogMixture.apply(*(t.detach() for t in (
        mixture.means, mixture.log_precisions, mixture.log_pis)), prior.sums, weights)
    (grad,) = torch.autograd.grad(nll, model[1].weight)
    assert torch.isfinite(nll)
    torch.testing.assert_close(nll, expected, rtol=1e-5, atol=1e-2)
    torch.testing.assert_close(grad, grad_expected, rtol=1e-4, atol=1e-3)


def test_a_failed_compilation_falls_back_to_the_same_prior(monkeypatch, caplog):
    def broken(kernel, **_):
        def run(*args):
            raise torch._dynamo.exc.BackendCompilerFailed(kernel, RuntimeError("no compiler"),
                                                          None)
        return run

    model = _model()
    expected = _prior(model, kernel="eager").negative_log_prior(model)
    monkeypatch.setattr(torch, "compile", broken)
    prior = _prior(model, kernel="compiled")
    torch.testing.assert_close(prior.negative_log_prior(model), expected)
    assert "torch.compile failed here" in caplog.text and "no compiler" in caplog.text


def test_without_a_c_compiler_the_native_kernel_falls_back(monkeypatch, caplog, tmp_path,
                                                            native_kernels):
    model = _model()
    expected = _prior(model, kernel="eager").negative_log_prior(model)
    monkeypatch.setenv("CC", "no-such-cc")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # nothing built there yet
    native_mixture._kernel.cache_clear()
    try:
        prior = _prior(model, kernel="eager")
        torch.testing.assert_close(prior.negative_log_prior(model), expected)
    finally:
        native_mixture._kernel.cache_clear()  # the next test builds with the real compiler
    assert "C kernel mixture.c is unavailable here" in caplog.text and "no-such-cc" in caplog.text


def test_an_unknown_kernel_is_refused_with_the_choices():
    with pytest.raises(UserError, match="regularizer.kernel.*compiled, eager"):
        SoftWeightSharing(kernel="fast")
    with pytest.raises(UserError, match="regularizer.kernel=native.*native_kernels=true"):
        SoftWeightSharing(kernel="native")


def test_a_collapsing_component_keeps_the_loss_finite():
    model = _model()
    prior = _prior(model, init_range=[-0.1, 0.1])
    with torch.no_grad():  # every weight exactly on component 1's mean, its variance → 0
        for p in model.parameters():
            p.fill_(float(prior.means[0]))
        prior.log_precisions[1] = 1e4
    loss = prior.penalty(model)
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.parameters()] + [t.grad for t in prior.state()]
    assert all(torch.isfinite(g).all() for g in grads)
    prior.prox(model, 0.1)  # the per-step projection brings it back into range
    assert prior.log_precisions.max().item() == pytest.approx(LOG_PRECISION_RANGE[1])

    # gradient steps on the log-precisions alone, which want every variance to vanish
    # around weights that sit on the means
    optimizer = torch.optim.SGD([prior.log_precisions], lr=100.0)
    for _ in range(20):
        optimizer.zero_grad()
        loss = prior.negative_log_prior(model)
        loss.backward()
        optimizer.step()
        prior.prox(model, 0.0)
        assert torch.isfinite(loss)
    assert prior.log_precisions[1].item() == pytest.approx(LOG_PRECISION_RANGE[1])


def test_means_start_over_the_weights_range_or_the_configured_one():
    model = _model()
    weights = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    prior = _prior(model)
    assert prior.means[0].item() == pytest.approx(weights.min().item())
    assert prior.means[-1].item() == pytest.approx(weights.max().item())
    assert _prior(model, init_range=[-0.6, 0.6]).means.tolist() == pytest.approx(
        [-0.6, -0.2, 0.2, 0.6])
    assert len(_prior(model, biases=False).flat_weights(model)) == 64 * 20 + 20 * 10


def test_mixture_state_has_its_own_learning_rates_and_reloads_in_place():
    model = _model()
    prior = _prior(model, lr_means=1e-4, lr_log_precisions=3e-3, lr_mixing=2e-3)
    optimizer = make_optimizer(model, prior, ScheduleConfig(optimizer="adam"), lr=5e-4)
    assert [g["lr"] for g in optimizer.param_groups] == [5e-4, 1e-4, 3e-3, 2e-3]
    assert optimizer.param_groups[1]["params"][0] is prior.means
    saved = prior.state_dict()
    with torch.no_grad():
        prior.means.add_(1.0)
    prior.load_state_dict(saved)
    assert torch.equal(prior.means, saved["means"])
    assert optimizer.param_groups[1]["params"][0] is prior.means


def test_stats_and_figure():
    model = _model()
    prior = _prior(model)
    stats = prior.stats(model)
    assert {"zero_share", "neg_log_prior", "mean/00", "std/04", "pi/04"} <= set(stats)
    assert stats["mean/00"] == 0 and 0 <= stats["zero_share"] <= 1
    assert sum(stats[f"pi/{j:02d}"] for j in range(5)) == pytest.approx(1.0)
    figure = prior.figures(model)["mixture"]
    assert len(figure.axes[0].lines) == 5  # one curve per component over the histogram


@pytest.mark.parametrize(("kwargs", "option"), [
    ({"lam": -1}, "regularizer.lam"),
    ({"pi_zero": 1}, "regularizer.pi_zero"),
    ({"pi_zero": 0}, "regularizer.pi_zero"),
    ({"components": 0}, "regularizer.components"),
    ({"init_range": [0.5, -0.5]}, "regularizer.init_range"),
    ({"gamma": [250.0]}, "regularizer.gamma"),
    ({"gamma_zero": [0.5, 2.0]}, r"regularizer.gamma_zero\[0\]"),
    ({"init_std": 0}, "regularizer.init_std"),
    ({"lr_means": -1}, "regularizer.lr_means"),
])
def test_bad_options_name_themselves(kwargs, option):
    with pytest.raises(UserError, match=option):
        SoftWeightSharing(**kwargs)


def test_merging_close_components():
    mixture = Mixture(means=torch.tensor([0.0, 0.5, 0.5, -0.5]),
                      log_precisions=torch.tensor([4.0, 2.0, 2.0, 2.0]),
                      log_pis=torch.tensor([0.7, 0.1, 0.15, 0.05]).log())
    merged = mixture.merged(1e-6)
    assert len(merged.means) == 3
    torch.testing.assert_close(merged.log_pis.exp().sum(), torch.tensor(1.0))
    i = int((merged.means - 0.5).abs().argmin())
    assert merged.log_pis[i].exp().item() == pytest.approx(0.25)
    assert merged.stds[i].item() == pytest.approx(math.exp(-1.0))
    # far apart components stay: KL(0 ‖ 0.5) with σ = e^-1 is about 1
    assert len(mixture.merged(0.5).means) == 3 and len(mixture.merged(10.0).means) == 1


def test_quantize_snaps_every_weight_to_a_mixture_mean():
    model = _model()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    prior = _prior(model)
    with torch.no_grad():
        prior.means.copy_(torch.tensor([-0.2, -0.05, 0.1, 0.2]))
        prior.log_precisions.fill_(6.0)
    compressed, report = Quantize()(model, prior.artifacts(model))
    values = torch.cat([p.reshape(-1) for p in compressed.parameters()]).unique()
    assert set(values.tolist()) <= {0.0, *prior.means.tolist()}
    assert report["mixture"]["after_merging"] == 5
    weights = prior.flat_weights(model).detach()
    expected = prior.mixture().log_weighted_densities(weights).argmax(1)
    chosen = torch.cat([p.reshape(-1) for p in compressed.parameters()])
    means = torch.cat([torch.zeros(1), prior.means.detach()])
    assert torch.equal(chosen, means[expected])
    assert 0 < report["1"]["nonzero_fraction"] < 1
    assert isinstance(model[1], nn.Linear) and len(model[1].weight.unique()) > 100  # untouched


def test_quantize_sets_the_mean_nearest_zero_to_zero():
    model = _model()
    prior = _prior(model, pi_zero=0.01)
    with torch.no_grad():
        prior.means.copy_(torch.tensor([-0.2, 0.01, 0.1, 0.2]))
        prior.log_precisions.fill_(6.0)
        prior.log_precisions[0] = -4.0  # a zero component too wide to win anything
    compressed, report = Quantize(merge_kl=1e9)(model, prior.artifacts(model))  # no merge …
    assert report["mixture"]["after_merging"] == 1  # … well, everything merges: mean → 0
    assert all((p == 0).all() for p in compressed.parameters())
    compressed, report = Quantize()(model, prior.artifacts(model))
    assert 0.0 in report["mixture"]["means"] and 0.01 not in report["mixture"]["means"]


def test_quantize_needs_the_mixture_of_sws():
    with pytest.raises(UserError, match="compress=kmeans"):
        Quantize()(_model(), L2().artifacts(_model()))


def test_a_run_pairing_quantize_with_another_regularizer_is_refused_before_training(make_cfg):
    cfg = make_cfg("model=lenet300", "regularizer=l2", "compress=quantize")
    with pytest.raises(UserError, match="no mixture comes from this run's regularizer, L2"):
        train(cfg)
    assert not (Path(cfg.paths.run_dir) / "checkpoints").exists()


# ------------------------------------------------------------------------------ whole runs

SWS_RUN = ("model=lenet300", "data.image_size=8", "regularizer=sws", "compress=quantize",
           "regularizer.components=4", "regularizer.pi_zero=0.5", "regularizer.init_std=0.05",
           "schedule.pretrain_epochs=1", "schedule.optimizer=adam", "schedule.lr=5e-4",
           "schedule.pretrain_lr=1e-3", "bench.latency=false")


def test_pretrain_retrain_quantize_store_and_reload(make_cfg, tmp_path):
    results = train(make_cfg(*SWS_RUN, "schedule.epochs=2"))
    run = tmp_path / "run"
    compression = results["compression"]
    assert {"params_ratio", "storage_ratio", "nonzero_fraction", "storage",
            "details"} <= set(compression)
    assert "mixture" in compression["details"]
    stored = compression["storage"]
    assert results["bytes"]["compressed"] == stored["bytes"] == (run / stored["file"]).stat(
        ).st_size
    assert stored["predicted_bytes"] <= stored["bytes"] <= stored["predicted_bytes"] + 6 * 64
    assert compression["storage_ratio"] == pytest.approx(
        32 * results["params"]["dense"] / (8 * stored["bytes"]))
    assert compression["params_ratio"] == pytest.approx(1 / compression["nonzero_fraction"])
    # the stored file rebuilds a model as accurate as the fine-tuned quantized one
    cfg = make_cfg(*SWS_RUN)
    data = build_data(cfg.data)
    skeleton = build_model(cfg.model, data.info)
    reloaded = storage.load(run / stored["file"], skeleton)
    assert evaluate(reloaded, data, torch.device("cpu")) == results["accuracy"]["finetuned"]
    values = torch.cat([p.reshape(-1) for p in reloaded.parameters()])
    assert len(values.unique()) <= 5  # still shared after fine-tuning: 4 means and zero
    # the mixture over training, in TensorBoard
    events = EventAccumulator(str(run / "tb"), size_guidance={"images": 0}).Reload()
    assert {"reg/zero_share", "reg/mean/01", "reg/std/00", "reg/pi/04"} <= set(
        events.Tags()["scalars"])
    assert len(events.Images("reg/mixture")) == 2  # one per retraining epoch
    assert results["regularizer"]["pi/00"] == pytest.approx(0.5)  # fixed


class _Interrupted(Exception):
    pass


def test_resume_restores_the_mixture(make_cfg, tmp_path, monkeypatch):
    args = (*SWS_RUN, "schedule.epochs=2", "schedule.finetune_epochs=0")
    train(make_cfg(*args, run_dir=tmp_path / "a"))
    real_save = checkpoint.save

    def save_then_stop(state, path):  # dies right after the first retraining epoch
        real_save(state, path)
        if path.name == "train.pt":
            raise _Interrupted

    monkeypatch.setattr(loop.checkpoint, "save", save_then_stop)
    with pytest.raises(_Interrupted):
        train(make_cfg(*args, run_dir=tmp_path / "b"))
    monkeypatch.undo()
    train(make_cfg(*args, "resume=true", run_dir=tmp_path / "b"))
    a, b = (checkpoint.load(tmp_path / run / "checkpoints" / "train.pt") for run in "ab")
    for key in ("means", "log_precisions", "mixing_logits"):
        assert torch.equal(a["regularizer"][key], b["regularizer"][key]), key
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(),
                    reason="Fashion-MNIST is not installed")
def test_the_experiment_chains_pretraining_and_retraining_in_one_run(make_cfg, tmp_path):
    results = train(make_cfg("experiment=ullrich2017_lenet300_fashion_cpu",
                             "schedule.pretrain_epochs=1", "bench.latency=false"))
    assert results["config"]["schedule"]["optimizer"] == "adam"
    assert results["accuracy"]["pretrained"] is not None
    assert {"pretrain.pt", "train.pt"} <= {p.name for p in
                                            (tmp_path / "run" / "checkpoints").iterdir()}
    assert results["compression"]["storage"]["file"] == "model_compressed.cwsf"


def test_init_from_a_missing_path_or_an_untrained_run_says_so(make_cfg, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        train(make_cfg(f"init_from={tmp_path / 'nowhere'}"))
    (tmp_path / "untrained" / "checkpoints").mkdir(parents=True)
    checkpoint.save({"model": {}}, tmp_path / "untrained" / "checkpoints" / "pretrain.pt")
    with pytest.raises(UserError, match="pretrain.pt"):
        train(make_cfg(f"init_from={tmp_path / 'untrained'}"))
