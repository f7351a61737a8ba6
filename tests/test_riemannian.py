"""RiemannianSGD / RiemannianAdam: on the manifold, against hand-computed steps, Procrustes' closed form and geoopt."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradwatch.remedies import RiemannianAdam, RiemannianSGD, recurrent_groups
from gradwatch.remedies.riemannian import cayley_retraction, qr_retraction, tangent


def orthonormal(n: int, p: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    w = torch.empty(n, p, dtype=dtype)
    nn.init.orthogonal_(w, generator=torch.Generator().manual_seed(seed))
    return w


def gap(w: torch.Tensor) -> float:
    """max |WᵀW − I| (of WWᵀ for a wide matrix)."""
    w = w if w.shape[0] >= w.shape[1] else w.T
    return float((w.T @ w - torch.eye(w.shape[1], dtype=w.dtype)).abs().max())


def gram_schmidt(a: torch.Tensor) -> torch.Tensor:
    """Classical Gram–Schmidt, column by column: the Q of A = QR with R's diagonal positive."""
    q = torch.zeros_like(a)
    for j in range(a.shape[1]):
        v = a[:, j].clone()
        for i in range(j):
            v -= (q[:, i] @ a[:, j]) * q[:, i]
        q[:, j] = v / v.norm()
    return q


@pytest.mark.parametrize("make", [
    lambda ps: RiemannianSGD(ps, lr=0.05, momentum=0.9),
    lambda ps: RiemannianSGD(ps, lr=0.05, momentum=0.9, retraction="cayley"),
    lambda ps: RiemannianAdam(ps, lr=0.01),
    lambda ps: RiemannianAdam(ps, lr=0.01, retraction="cayley"),
], ids=["sgd-qr", "sgd-cayley", "adam-qr", "adam-cayley"])
def test_stays_orthogonal_over_1000_steps(make) -> None:
    g = torch.Generator().manual_seed(0)
    square, tall, wide = (nn.Parameter(orthonormal(*s, seed=i)) for i, s in enumerate([(32, 32), (24, 8), (6, 20)]))
    targets = [torch.randn(p.shape, generator=g) for p in (square, tall, wide)]
    opt = make([square, tall, wide])
    for _ in range(1000):
        loss = sum(((p @ p.T @ t) ** 3).sum() - (p * t).sum() for p, t in zip((square, tall, wide), targets))
        opt.zero_grad()
        loss.backward()
        opt.step()
    for p in (square, tall, wide):
        assert gap(p.detach()) < 1e-5
    assert float((square.detach() - orthonormal(32, 32, seed=0)).abs().max()) > 0.1  # it moved


def test_one_sgd_step_is_projection_then_qr_by_hand() -> None:
    w0 = orthonormal(7, 4, seed=1, dtype=torch.float64)
    grad = torch.randn(7, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    w = nn.Parameter(w0.clone())
    w.grad = grad.clone()
    RiemannianSGD([w], lr=0.3).step()
    wtg = w0.T @ grad
    xi = grad - w0 @ ((wtg + wtg.T) / 2)  # G − W sym(WᵀG)
    expected = gram_schmidt(w0 - 0.3 * xi)
    torch.testing.assert_close(w.detach(), expected, rtol=0, atol=1e-12)


def test_two_momentum_steps_transport_the_buffer_by_projection() -> None:
    w0 = orthonormal(5, 5, seed=3, dtype=torch.float64)
    g1, g2 = torch.randn(2, 5, 5, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    w = nn.Parameter(w0.clone())
    opt = RiemannianSGD([w], lr=0.1, momentum=0.5)
    w.grad = g1.clone()
    opt.step()
    w.grad = g2.clone()
    opt.step()

    def proj(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        s = x.T @ g
        return g - x @ (s + s.T) / 2

    b1 = proj(w0, g1)
    w1 = gram_schmidt(w0 - 0.1 * b1)
    b2 = 0.5 * proj(w1, b1) + proj(w1, g2)
    torch.testing.assert_close(w.detach(), gram_schmidt(w1 - 0.1 * b2), rtol=0, atol=1e-12)


@pytest.mark.parametrize("retract", [qr_retraction, cayley_retraction], ids=["qr", "cayley"])
def test_retractions_are_first_order_and_land_on_the_manifold(retract) -> None:
    w = orthonormal(9, 5, seed=5, dtype=torch.float64)
    xi = tangent(w, torch.randn(9, 5, generator=torch.Generator().manual_seed(6), dtype=torch.float64))
    assert float((w.T @ xi + xi.T @ w).abs().max()) < 1e-12  # ξ is tangent: WᵀΞ skew
    torch.testing.assert_close(retract(w, 0 * xi), w, rtol=0, atol=1e-12)  # R_W(0) = W
    t = 1e-6
    velocity = (retract(w, t * xi) - retract(w, -t * xi)) / (2 * t)  # central finite difference of t ↦ R_W(tξ)
    torch.testing.assert_close(velocity, xi, rtol=0, atol=1e-6)
    assert gap(retract(w, 0.7 * xi)) < 1e-12


def test_the_projection_is_orthogonal() -> None:
    w = orthonormal(8, 3, seed=7, dtype=torch.float64)
    g, h = torch.randn(2, 8, 3, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    xi, eta = tangent(w, g), tangent(w, h)
    assert abs(float(((g - xi) * eta).sum())) < 1e-12  # the discarded part is normal to every tangent vector
    torch.testing.assert_close(tangent(w, xi), xi, rtol=0, atol=1e-12)  # idempotent


@pytest.mark.parametrize("opt_cls", [RiemannianSGD, RiemannianAdam])
def test_solves_orthogonal_procrustes(opt_cls) -> None:
    """min ‖W − M‖_F over 10×4 orthonormal W has the closed form W* = UVᵀ (M = UΣVᵀ, thin SVD)."""
    m = torch.randn(10, 4, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    u, _, vh = torch.linalg.svd(m, full_matrices=False)
    w = nn.Parameter(orthonormal(10, 4, seed=10, dtype=torch.float64))
    opt = opt_cls([w], lr=0.05, momentum=0.5) if opt_cls is RiemannianSGD else opt_cls([w], lr=0.02)
    for _ in range(600):
        opt.zero_grad()
        ((w - m) ** 2).sum().backward()
        opt.step()
    torch.testing.assert_close(w.detach(), u @ vh, rtol=0, atol=1e-4)


def test_euclidean_groups_take_torchs_steps() -> None:
    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    twin = nn.Linear(6, 3)
    twin.load_state_dict(model.state_dict())
    x = torch.randn(16, 6)
    for ours, ref in [(RiemannianSGD([{"params": model.parameters(), "stiefel": False}], lr=0.1, momentum=0.9),
                       torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)),
                      (RiemannianAdam([{"params": model.parameters(), "stiefel": False}], lr=0.01),
                       torch.optim.Adam(twin.parameters(), lr=0.01))]:
        for _ in range(20):
            for net, opt in ((model, ours), (twin, ref)):
                opt.zero_grad()
                (net(x) ** 2).sum().backward()
                opt.step()
        for a, b in zip(model.parameters(), twin.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_recurrent_groups_put_only_w_hh_on_the_manifold() -> None:
    rnn = nn.RNN(3, 8, num_layers=2)
    for name, p in rnn.named_parameters():
        if name.startswith("weight_hh"):
            nn.init.orthogonal_(p)
    groups = recurrent_groups(rnn)
    assert [id(p) for p in groups[0]["params"]] == [id(rnn.weight_hh_l0), id(rnn.weight_hh_l1)]
    assert len(groups[1]["params"]) == 6
    opt = RiemannianSGD(groups, lr=0.1)
    before = rnn.weight_ih_l0.detach().clone()
    out, _ = rnn(torch.randn(5, 4, 3))
    out.pow(2).sum().backward()
    opt.step()
    assert gap(rnn.weight_hh_l0.detach()) < 1e-5 and gap(rnn.weight_hh_l1.detach()) < 1e-5
    torch.testing.assert_close(rnn.weight_ih_l0.detach(), before - 0.1 * rnn.weight_ih_l0.grad)


def test_bad_arguments_name_the_argument() -> None:
    with pytest.raises(ValueError, match=r"`RiemannianSGD\(params=…\)` expects matrices with orthonormal"):
        RiemannianSGD([nn.Parameter(torch.randn(4, 4))], lr=0.1)
    with pytest.raises(ValueError, match=r"`RiemannianSGD\(params=…\)` expects matrices \(2-D\)"):
        RiemannianSGD([nn.Parameter(torch.ones(3))], lr=0.1)
    w = nn.Parameter(orthonormal(4, 4, seed=0))
    with pytest.raises(ValueError, match=r"`RiemannianSGD\(lr=…\)` expects a positive number, got -1"):
        RiemannianSGD([w], lr=-1)
    with pytest.raises(ValueError, match=r"`RiemannianAdam\(retraction=…\)` expects 'qr' or 'cayley', got 'exp'"):
        RiemannianAdam([w], retraction="exp")
    with pytest.raises(ValueError, match=r"`RiemannianSGD\(momentum=…\)` expects a number in \[0, 1\), got 1.5"):
        RiemannianSGD([w], momentum=1.5)
    with pytest.raises(ValueError, match=r"`recurrent_groups\(module=…\)` expects a module with weight_hh"):
        recurrent_groups(nn.Linear(2, 2))


def test_matches_geoopt_riemannian_sgd() -> None:
    """geoopt's RiemannianSGD on its EuclideanStiefel (same projection, QR retraction, transport by projection).

    geoopt starts its momentum buffer at the *Euclidean* gradient and then adds
    the Riemannian one (b = μ·G + ξ on step 1); PyTorch's convention, ours, is
    b = ξ. Seeding geoopt's buffer with zeros gives b = ξ there too.
    """
    geoopt = pytest.importorskip("geoopt")
    target = torch.randn(12, 5, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    start = orthonormal(12, 5, seed=12, dtype=torch.float64)
    ours = nn.Parameter(start.clone())
    theirs = geoopt.ManifoldParameter(start.clone(), manifold=geoopt.EuclideanStiefel())
    opt_ours = RiemannianSGD([ours], lr=0.02, momentum=0.8)
    opt_theirs = geoopt.optim.RiemannianSGD([theirs], lr=0.02, momentum=0.8)
    opt_theirs.state[theirs]["momentum_buffer"] = torch.zeros_like(start)
    for _ in range(200):
        for p, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            opt.zero_grad()
            (((p - target) ** 2).sum() + (p[:3] ** 4).sum()).backward()
            opt.step()
    torch.testing.assert_close(ours.detach(), theirs.detach().clone(), rtol=0, atol=1e-10)
    assert float((ours.detach() - start).abs().max()) > 0.1
