"""The spectral regulariser and the ReLU weight normaliser (Filan et al. 2021, promoting
clusterability): values, exact gradients, the three solvers (the tracking solver's error bounds
and fallback), and the function-preserving rescaling."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from threadpoolctl import threadpool_limits
from torch import nn

from cluster_tracking.errors import ConfigError, GraphError
from cluster_tracking.graph import weight_graph
from cluster_tracking.promote.normalization import ReLUWeightNormalizer
from cluster_tracking.promote.regularizer import DEFAULT_TOL, TRACKING_TOL, SpectralRegularizer
from cluster_tracking.spectral.partition import laplacian_eigenvalues


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """These graphs are tiny: one thread is fastest, and immune to busy CI cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(threads)


def _mlp(*widths: int, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for fan_in, fan_out in itertools.pairwise(widths):
        layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
    return nn.Sequential(*layers[:-1]).double()


class _SmallCNN(nn.Module):
    """Conv + BatchNorm, a grouped conv + BatchNorm, max-pooling, and a flatten into a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, groups=2)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 3 * 3, 6)
        self.out = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        return self.out(F.relu(self.fc(x.flatten(1))))


def _cnn(seed: int = 0) -> _SmallCNN:
    torch.manual_seed(seed)
    model = _SmallCNN().double()
    with torch.no_grad():  # BatchNorm statistics as after some training
        for bn in (model.bn1, model.bn2):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.running_mean.uniform_(-0.5, 0.5)
    return model


class _Residual(nn.Module):
    """A residual add identifies units, so the graph is not bipartite."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(12, 16), nn.Linear(16, 16), nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.a(x))
        return self.c(h + F.relu(self.b(h)))


def _grads(model: nn.Module) -> list[torch.Tensor]:
    return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in model.parameters()]


# --- the value -------------------------------------------------------------------------------


@pytest.mark.parametrize("solver", ["dense", "iterative", "tracking"])
@pytest.mark.parametrize("make", [lambda: _mlp(10, 14, 12, 4), _cnn, lambda: _Residual().double()])
def test_penalty_is_weight_over_k_times_the_k_smallest_nontrivial_eigenvalues(
    solver: str, make: object
) -> None:
    assert callable(make)
    model = make()
    k, weight = 4, 0.3
    reg = SpectralRegularizer(model, k=k, weight=weight, solver=solver)  # type: ignore[arg-type]

    penalty = reg()

    # the same graph as weight_graph (BatchNorm folded, flatten, residual identification),
    # eigenvalues from the package's scipy solver; eigenvalue 0 (constant direction) skipped
    expected = laplacian_eigenvalues(weight_graph(model), k + 1, seed=0)
    assert expected[0] == pytest.approx(0.0, abs=1e-9)
    np.testing.assert_allclose(reg.last_eigenvalues, expected[1:], rtol=1e-7, atol=1e-9)
    assert float(penalty.detach()) == pytest.approx(weight / k * expected[1:].sum(), rel=1e-7)
    assert penalty.requires_grad and penalty.ndim == 0


@pytest.mark.parametrize("solver", ["dense", "iterative"])
@pytest.mark.parametrize(
    ("affine", "running_stats"), [(True, True), (True, False), (False, True), (False, False)]
)
def test_batchnorm_folds_as_the_weight_graph_folds_it(
    affine: bool, running_stats: bool, solver: str
) -> None:
    """The regulariser's live BatchNorm fold (torch, differentiable in gamma) gives the graph's
    ``|gamma| / sqrt(running_var + eps)``, ``|gamma|`` without running statistics and 1 without
    affine parameters: the same eigenvalues as ``weight_graph``."""
    torch.manual_seed(2)
    batchnorm = nn.BatchNorm1d(12, affine=affine, track_running_stats=running_stats)
    model = nn.Sequential(nn.Linear(10, 12), batchnorm, nn.ReLU(), nn.Linear(12, 6)).double()
    with torch.no_grad():
        if affine:
            batchnorm.weight.uniform_(-1.5, 1.5)
        if running_stats:
            batchnorm.running_var.uniform_(0.2, 3.0)
    reg = SpectralRegularizer(model, k=3, solver=solver)  # type: ignore[arg-type]
    graph = weight_graph(model)
    assert graph.blocks[0].batchnorm == "1"
    expected = laplacian_eigenvalues(graph, 4, seed=0)[1:]
    np.testing.assert_allclose(reg.eigenvalues(), expected, rtol=1e-7, atol=1e-9)


# --- exact gradients -------------------------------------------------------------------------


@pytest.mark.parametrize("solver", ["dense", "iterative", "tracking"])
def test_autograd_gradient_equals_finite_differences(solver: str) -> None:
    model = _cnn(seed=1)
    reg = SpectralRegularizer(model, k=3, weight=1.0, solver=solver)  # type: ignore[arg-type]
    reg.eigenvalue_sum().backward()

    step = 1e-6
    for param in (model.conv2.weight, model.bn1.weight, model.fc.weight):
        assert param.grad is not None
        flat, grad = param.data.view(-1), param.grad.view(-1)
        for index in range(0, flat.numel(), max(1, flat.numel() // 12)):
            original = float(flat[index])
            with torch.no_grad():
                flat[index] = original + step
                above = float(reg.eigenvalue_sum())
                flat[index] = original - step
                below = float(reg.eigenvalue_sum())
                flat[index] = original
            numeric = (above - below) / (2 * step)
            assert float(grad[index]) == pytest.approx(numeric, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("solver", ["iterative", "tracking"])
@pytest.mark.parametrize("make", [lambda: _mlp(48, 64, 64, 10), lambda: _Residual().double()])
def test_iterative_path_agrees_with_dense_path_in_values_and_gradients(
    make: object, solver: str
) -> None:
    """A first call solves to the iterative tolerance, tracking or not."""
    assert callable(make)
    model = make()
    values, grads = [], []
    for name in ("dense", solver):
        reg = SpectralRegularizer(model, k=6, weight=1.0, solver=name)  # type: ignore[arg-type]
        model.zero_grad()
        reg().backward()
        values.append(reg.last_eigenvalues)
        grads.append(_grads(model))
    np.testing.assert_allclose(values[1], values[0], rtol=1e-9)
    for iterative, dense in zip(grads[1], grads[0], strict=True):
        # tol=1e-7 on the eigenvector residuals: gradients exact to ~tol / spectral gap
        scale = float(dense.abs().max())
        np.testing.assert_allclose(iterative.numpy(), dense.numpy(), rtol=0, atol=1e-5 * scale)


def test_zero_weights_get_a_zero_subgradient_and_dead_units_are_left_out() -> None:
    model = _mlp(6, 8, 8, 3, seed=2)
    with torch.no_grad():
        model[0].weight[0, :3] = 0.0
        model[0].weight[5, :] = 0.0  # hidden unit 5 of layer 0 has no edges at all:
        model[2].weight[:, 5] = 0.0  # it is left out of the graph, as spectral clustering does
    for solver in ("dense", "iterative", "tracking"):
        model.zero_grad()
        reg = SpectralRegularizer(model, k=3, solver=solver)  # type: ignore[arg-type]
        reg().backward()
        grad = model[0].weight.grad
        assert grad is not None and torch.isfinite(grad).all()
        assert torch.all(grad[0, :3] == 0) and torch.all(grad[5] == 0)
        expected = laplacian_eigenvalues(weight_graph(model), 4, seed=0)[1:]
        np.testing.assert_allclose(reg.last_eigenvalues, expected, rtol=1e-7)


# --- training --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "k", "solver"),
    [
        (lambda: _mlp(16, 24, 24, 6, seed=3), 5, "dense"),
        (lambda: _mlp(16, 24, 24, 6, seed=3), 5, "tracking"),
        (_cnn, 4, "dense"),
        (_cnn, 4, "tracking"),
    ],
)
def test_sgd_on_the_regulariser_lowers_the_eigenvalue_sum(
    make: object, k: int, solver: str
) -> None:
    assert callable(make)
    model = make().float()
    reg = SpectralRegularizer(model, k=k, weight=1.0, solver=solver)  # type: ignore[arg-type]
    normalize = ReLUWeightNormalizer(model)  # so the drop is not a rescaling artefact
    optimiser = torch.optim.SGD(model.parameters(), lr=2.0)
    before = reg.eigenvalues().sum()
    for _ in range(30):
        optimiser.zero_grad()
        reg().backward()
        optimiser.step()
        normalize()
    after = reg.eigenvalues().sum()
    assert after < 0.6 * before


def test_every_n_steps_evaluates_every_nth_call_and_rescales() -> None:
    model = _mlp(6, 8, 3)
    every = SpectralRegularizer(model, k=2, weight=0.5)
    value = float(every().detach())
    amortised = SpectralRegularizer(model, k=2, weight=0.5, every_n_steps=3)
    plain = SpectralRegularizer(model, k=2, weight=0.5, every_n_steps=3, rescale=False)

    calls = [amortised() for _ in range(6)]
    assert [float(c.detach()) for c in calls] == pytest.approx([3 * value, 0, 0, 3 * value, 0, 0])
    assert not calls[1].requires_grad and calls[0].requires_grad
    assert float(plain().detach()) == pytest.approx(value)
    assert float(plain()) == 0.0
    assert amortised.calls == 6


class _WideResidual(nn.Module):
    """A residual MLP of width 150 in float32: its eigensolve stalls at float32 round-off."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(150, 150), nn.Linear(150, 150), nn.Linear(150, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.a(x))
        h = h + F.relu(self.b(h))
        return self.c(h)


@pytest.mark.parametrize("solver", ["iterative", "tracking"])
def test_a_solve_stalled_above_tol_warns_from_the_line_that_called_the_regulariser(
    solver: str,
) -> None:
    """The penalty is then approximate: a RuntimeWarning says so, pointing at the user's call
    (not at the solver's internals), and ``last_residual`` shows how far above tol it stopped."""
    torch.manual_seed(0)
    reg = SpectralRegularizer(_WideResidual(), k=6, solver=solver, tol=1e-9)  # type: ignore[arg-type]
    with pytest.warns(RuntimeWarning, match=f"the {solver} eigensolver stopped") as caught:
        reg()
    assert [warning.filename for warning in caught] == [__file__]
    assert reg.last_residual is not None and reg.last_residual > 1e-6


def test_iterative_solver_warm_starts_from_the_last_eigenvectors() -> None:
    model = _mlp(48, 64, 64, 10)
    reg = SpectralRegularizer(model, k=6, solver="iterative")
    reg()
    cold = reg.last_solver_applies
    with torch.no_grad():
        model[2].weight.mul_(1.0 + 1e-4 * torch.randn_like(model[2].weight))
    reg()
    assert reg.last_solver_applies < cold


# --- the tracking solver ----------------------------------------------------------------------


def _spectrum_and_gradient(model: nn.Module, k: int) -> tuple[np.ndarray, list[torch.Tensor]]:
    """The exact k + 1 smallest non-trivial eigenvalues (float64, dense) and the gradient of the
    sum of the first k in the model's parameters."""
    exact = copy.deepcopy(model).double()
    ahead = SpectralRegularizer(exact, k=k + 1, solver="dense").eigenvalues()
    SpectralRegularizer(exact, k=k, weight=1.0, solver="dense").eigenvalue_sum().backward()
    return ahead, _grads(exact)


def _adam_steps(model: nn.Module, reg: SpectralRegularizer, seed: int) -> Iterator[int]:
    """Train ``model`` with Adam (lr 1e-3) on random data plus the regulariser, yielding before
    each step; as a training loop would, the regulariser is called once per step."""
    n_in = next(model.parameters()).shape[1]
    generator = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    inputs = torch.randn(256, n_in, generator=generator, dtype=dtype)
    labels = torch.randint(0, 10, (256,), generator=generator)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    for step in itertools.count():
        yield step
        batch = torch.randint(0, 256, (32,), generator=generator)
        loss = F.cross_entropy(model(inputs[batch]), labels[batch]) + reg()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tracking_stays_within_its_residual_bound_of_the_exact_penalty_and_gradient(
    dtype: torch.dtype,
) -> None:
    """Across a training run (Adam, lr 1e-3), every tracking evaluation is accepted at its
    residual tolerance, its eigenvalue sum is an upper bound of the exact sum (Cauchy
    interlacing) that exceeds it by at most sum_i r_i^2 / gap, and its gradient is within
    max_i r_i / gap (relative) of the exact gradient (Davis-Kahan)."""
    k = 6
    model = _mlp(48, 64, 64, 10, seed=6).to(dtype)
    reg = SpectralRegularizer(model, k=k, weight=0.5, solver="tracking")
    eps = 1e-5 if dtype == torch.float32 else 1e-12  # round-off of the solver's arithmetic
    for step in _adam_steps(model, reg, seed=0):
        if step == 25:
            break
        ahead, exact_grads = _spectrum_and_gradient(model, k)
        gap = ahead[k] - ahead[k - 1]
        model.zero_grad()
        total = reg.eigenvalue_sum()
        total.backward()
        residual = reg.last_residual
        assert residual is not None and residual <= TRACKING_TOL[dtype]
        exact = float(ahead[:k].sum())
        assert -eps <= float(total.detach()) - exact <= k * residual**2 / gap + eps
        tracked = torch.cat([grad.flatten().double() for grad in _grads(model)])
        reference = torch.cat([grad.flatten() for grad in exact_grads])
        error = float((tracked - reference).norm() / reference.norm())
        assert error <= residual / gap + 100 * eps


def test_tracking_takes_one_operator_application_per_call_in_a_steady_training_run() -> None:
    model = _mlp(48, 64, 64, 10, seed=7).float()
    reg = SpectralRegularizer(model, k=6, solver="tracking")
    applies = []  # of each call
    for step in _adam_steps(model, reg, seed=1):
        if step == 40:
            break
        if step:
            applies.append(reg.last_solver_applies)
    assert applies[0] > 1  # the cold solve
    assert applies[2:] == [1] * len(applies[2:])  # (call 1: after Adam's first, largest step)


@pytest.mark.parametrize("make", [_cnn, lambda: _Residual().double()])
def test_tracking_follows_convolutional_and_non_bipartite_graphs(make: object) -> None:
    """The CNN (BatchNorm, grouped conv, flatten) is bipartite; the residual net is not, and is
    tracked by a block Krylov step instead of a power step."""
    assert callable(make)
    model = make()
    reg = SpectralRegularizer(model, k=4, solver="tracking")
    reg.eigenvalues()
    generator = torch.Generator().manual_seed(2)
    for _ in range(10):  # small steps, as an optimiser takes
        with torch.no_grad():
            for param in model.parameters():
                noise = torch.randn(param.shape, generator=generator, dtype=param.dtype)
                param.mul_(1.0 + 1e-3 * noise)
        values = reg.eigenvalues()
        assert reg.last_solver_applies == 1
        residual = reg.last_residual
        assert residual is not None and residual <= TRACKING_TOL[torch.float64]
        ahead = laplacian_eigenvalues(weight_graph(model), 6, seed=0)[1:]
        gap = ahead[4] - ahead[3]
        assert np.all(values >= ahead[:4] - 1e-12)  # interlacing: each an upper bound
        assert values.sum() - ahead[:4].sum() <= 4 * residual**2 / gap + 1e-12


@pytest.mark.parametrize(
    ("make", "k", "change"),
    [(lambda: _mlp(48, 64, 64, 10, seed=8), 6, 3e-2), (lambda: _Residual().double(), 4, 2e-2)],
)
def test_tracking_widens_its_subspace_once_when_one_step_does_not_follow(
    make: object, k: int, change: float
) -> None:
    """A change of the weights too large for one tracking step, as ``every_n_steps`` makes, is
    followed with a second application (the residuals' block Krylov step), not a full solve."""
    assert callable(make)
    model = make()
    reg = SpectralRegularizer(model, k=k, solver="tracking")
    reg.eigenvalues()
    reg.eigenvalues()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():  # every weight moved by about `change` (relative)
        for param in model.parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=param.dtype)
            param.mul_(1.0 + change * noise)

    values = reg.eigenvalues()

    assert reg.last_solver_applies == 2
    residual = reg.last_residual
    assert residual is not None and residual <= TRACKING_TOL[torch.float64]
    exact = laplacian_eigenvalues(weight_graph(model), k + 2, seed=0)[1:]
    gap = exact[k] - exact[k - 1]
    assert np.all(values >= exact[:k] - 1e-12)  # interlacing: each an upper bound
    assert values.sum() - exact[:k].sum() <= k * residual**2 / gap + 1e-12
    reg.eigenvalues()
    assert reg.last_solver_applies == 1  # and tracks in one application again


def test_tracking_falls_back_to_the_full_solve_after_a_large_weight_change() -> None:
    model = _mlp(48, 64, 64, 10, seed=8)
    reg = SpectralRegularizer(model, k=6, solver="tracking")
    reg.eigenvalues()
    reg.eigenvalues()
    assert reg.last_solver_applies == 1  # unchanged weights: tracked at once
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():  # no longer a small step: every weight scaled by 0.2 .. 1.8
        for param in model.parameters():
            param.mul_(0.2 + 1.6 * torch.rand(param.shape, generator=generator, dtype=param.dtype))

    values = reg.eigenvalues()

    assert reg.last_solver_applies > 2  # the tracking step, its widening, then the full solve
    residual = reg.last_residual  # the fallback solves to the iterative solver's tolerance
    assert residual is not None and residual <= DEFAULT_TOL[torch.float64]
    expected = laplacian_eigenvalues(weight_graph(model), 7, seed=0)[1:]
    np.testing.assert_allclose(values, expected, rtol=1e-9)
    reg.eigenvalues()
    assert reg.last_solver_applies == 1  # and tracks again from there


def test_auto_tracks_above_dense_max_nodes_and_solves_densely_below() -> None:
    model = _mlp(10, 14, 12, 4)  # 40 nodes
    assert SpectralRegularizer(model, k=3).solver == "dense"
    assert SpectralRegularizer(model, k=3, dense_max_nodes=39).solver == "tracking"
    assert SpectralRegularizer(model, k=3, solver="dense").last_residual is None


# --- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"k": 0}, "k must be"),
        ({"k": 40}, "use k <="),
        ({"weight": -1.0}, "weight must be"),
        ({"every_n_steps": 0}, "every_n_steps"),
        ({"solver": "fast"}, "solver must be"),
        ({"tol": 0.0}, "tol must be"),
    ],
)
def test_bad_arguments_raise_config_errors_that_say_what_to_do(
    kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        SpectralRegularizer(_mlp(6, 8, 3), **kwargs)  # type: ignore[arg-type]


def test_a_state_dict_is_refused_with_a_graph_error() -> None:
    with pytest.raises(GraphError, match=r"nn\.Module"):
        SpectralRegularizer(_mlp(6, 8, 3).state_dict())  # type: ignore[arg-type]


# --- the ReLU weight normaliser --------------------------------------------------------------


class _FunctionalMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(5, 7), nn.Linear(7, 7), nn.Linear(7, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.leaky_relu(self.fc1(x), 0.1)
        x = F.dropout(F.relu(self.fc2(x)), 0.5, self.training)
        return F.log_softmax(self.fc3(x), dim=1)


def _scramble_scales(model: nn.Module, seed: int) -> None:
    """Multiply every parameter entrywise by a random factor in [0.2, 3]: no longer normalised."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            factor = torch.rand(param.shape, generator=generator, dtype=param.dtype)
            param.mul_(0.2 + 2.8 * factor)


@pytest.mark.parametrize("make", [_cnn, lambda: _FunctionalMLP().double()])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_normaliser_keeps_the_function_and_fixes_incoming_norms(make: object, mode: str) -> None:
    assert callable(make)
    model = make()
    _scramble_scales(model, seed=0)
    model.train(mode == "train")
    inputs = torch.randn(5, 3, 10, 10) if isinstance(model, _SmallCNN) else torch.randn(5, 5)
    inputs = inputs.double()
    torch.manual_seed(0)  # dropout masks
    before = model(inputs)

    normalize = ReLUWeightNormalizer(model, norm=1.5)
    normalize()

    for hidden in normalize.layers:  # (before a train-mode forward moves the BatchNorm stats)
        norms = hidden.incoming_norms()
        torch.testing.assert_close(norms, torch.full_like(norms, 1.5))
    torch.manual_seed(0)
    torch.testing.assert_close(model(inputs), before, rtol=1e-10, atol=1e-12)


def test_normaliser_undoes_function_preserving_rescalings_of_relu_units() -> None:
    """Two networks that differ by a rescaling of ReLU units (the same function) normalise to the
    same weights, so the regulariser cannot tell them apart: the loophole is closed."""
    model = _mlp(6, 9, 9, 3, seed=4)
    rescaled = copy.deepcopy(model)
    scale = torch.rand(9, dtype=torch.float64) * 4 + 0.1
    with torch.no_grad():  # unit b of the first hidden layer: incoming * c_b, outgoing / c_b
        rescaled[0].weight.mul_(scale[:, None])
        rescaled[0].bias.mul_(scale)
        rescaled[2].weight.div_(scale[None, :])
    ReLUWeightNormalizer(model, norm=1.0)()
    ReLUWeightNormalizer(rescaled, norm=1.0)()
    for original, other in zip(model.parameters(), rescaled.parameters(), strict=True):
        torch.testing.assert_close(other, original)
    np.testing.assert_allclose(
        SpectralRegularizer(rescaled, k=3).eigenvalues(),
        SpectralRegularizer(model, k=3).eigenvalues(),
    )


def test_normaliser_default_target_keeps_each_layers_initial_scale() -> None:
    model = _mlp(6, 9, 9, 3, seed=5)
    norms = torch.sqrt((model[0].weight.detach() ** 2).sum(1) + model[0].bias.detach() ** 2)
    normalize = ReLUWeightNormalizer(model)
    normalize()
    rms = float(torch.sqrt((norms**2).mean()))
    assert normalize.layers[0].target == pytest.approx(rms)
    torch.testing.assert_close(
        normalize.layers[0].incoming_norms(), torch.full((9,), rms, dtype=torch.float64)
    )


def test_normaliser_refuses_non_homogeneous_activations_and_residuals() -> None:
    tanh = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2))
    with pytest.raises(GraphError, match="not positively homogeneous"):
        ReLUWeightNormalizer(tanh)
    with pytest.raises(GraphError, match="residual add"):
        ReLUWeightNormalizer(_Residual())
