"""gradnorm's ``sam`` against external SAM implementations, in float64, on the conformance problems.

Three independent implementations run the same 20-step SAM trajectory (plain SGD with the
scenario learning rate ``_LR[problem][0]``, ``rho = 0.05``; ASAM with ``rho = 0.5``, ``eta = 0``),
and every trajectory is recorded as flat float64 NumPy parameter vectors (a
:class:`conformance.reference.Trajectory`):

* gradnorm: ``gradnorm.step(..., rule="sam")`` on JAX arrays (``jax.value_and_grad``, the base
  update ``optax.sgd``) or on PyTorch tensors (autograd, the base update ``torch.optim.SGD``).
* ``optax.contrib.sam(optax.sgd(lr), optax.chain(optax.contrib.normalize(), optax.sgd(rho)),
  sync_period=2, opaque_mode=True)``, driven as ``update(g, state, params, grad_fn=f)`` with
  ``f(adv_params, i)`` the gradient at the adversarial point (the outer update is then taken at
  the unperturbed params with the gradient from the adversarial point).
* ``pytorch_optimizer.SAM(params, torch.optim.SGD, rho=rho, lr=lr)`` (optionally
  ``adaptive=True``), driven by its closure API: compute the gradients at the current weights,
  then ``opt.step(closure)``, where the closure recomputes loss and gradients at the perturbed
  weights; ``first_step`` perturbs, ``second_step`` restores the weights and runs SGD.

The differences that were found, by reading the installed sources, and how they are neutralized:

* optax's ``normalize`` divides by the raw norm, ``g / ||g||``; gradnorm divides by
  ``||g|| + norm_eps`` (default 1e-12). With ``norm_eps=0`` the two compute the same numbers up
  to the order of the roundings (``(g / n) * rho`` against ``(rho / n) * g``), so the
  trajectories agree to round-off (measured <= 1.1e-16 relative over 20 steps). With the
  default ``norm_eps=1e-12`` the perturbation is ``rho g / ||g|| * (1 - 1e-12/||g|| + ...)``:
  it differs by the relative amount ``1e-12 / ||g||``, i.e. by at most ``rho 1e-12 / ||g||``
  in absolute terms, and one SGD step moves that into the parameters multiplied by
  ``lr ||H||`` (below 2 on a stable run), see :func:`norm_eps_bound`. On these problems
  ``||g||`` stays above 0.06, so ``1e-12/||g||`` is at most 1.6e-11, and the measured
  differences are <= 2.2e-13 relative.
* pytorch_optimizer 4.x (``optimizer/sam.py::SAM.first_step`` with
  ``utils/gradient.py::get_global_gradient_norm``) takes the per-tensor norms in the tensors'
  dtype (float64 here) but then casts them to **float32** (``torch.stack(norms).float()``),
  squares and sums them in float32, takes the sqrt in float32 and adds ``perturb_eps=1e-12``
  **outside the sqrt**, in float32 (where it is absorbed unless the norm is below ~1e-5);
  ``scale = rho / norm`` is then a float32 0-d tensor (Python float / float32 tensor, which
  torch evaluates as ``norm.reciprocal() * rho`` in float32), cast to
  the parameters' dtype only when it multiplies the gradient. So the perturbation carries a
  relative error of a few float32 unit round-offs (2^-24 ~ 6e-8); it moves the perturbed
  gradient by ``||H|| rho ~1e-7`` and each SGD step moves the parameters by ``lr`` times that.
  That cannot be switched off by a setting (``foreach`` only changes how the float64 per-tensor
  norms are taken; ``perturb_eps=0`` removes the epsilon but not the float32 rounding, and
  here gives bit-identical trajectories since 1e-12 vanishes in float32 next to norms >= 0.06), and
  nothing is monkeypatched. Instead :func:`gradnorm_sam_trajectory` can *emulate* it
  (``emulate_float32_norm=True``): before each step the driver computes pytorch_optimizer's
  float32 ``scale`` from the gradient at the current params (with the same torch operations)
  and passes ``rho_k = scale * ||v||`` (``v = g``, or ``|theta| g`` for ASAM) with
  ``norm_eps=0`` to gradnorm, so gradnorm's perturbation ``rho_k v / ||v||`` equals
  pytorch_optimizer's ``scale * v`` up to float64 round-off. The emulated trajectories agree to
  <= 2e-16 (0 on the quadratic); the plain ones differ by the float32 effect (measured
  2e-10 .. 9e-10 for SAM, 6e-10 .. 7e-9 for ASAM; DESIGN.md section 8 quotes ~1e-10), well inside
  the worst-case first-order bound :func:`float32_norm_bound` (7e-8 .. 2e-6).
* ASAM: pytorch_optimizer (like davda54/sam) uses ``e = rho w^2 g / (|| |w| g || + eps)`` on
  every parameter, which is gradnorm's ``sam(adaptive=True, eta=0)`` (``T = |w|``, ``T^2 = w^2``).

Imports of jax, optax, torch and pytorch_optimizer happen inside the functions, so importing this
module needs NumPy only.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import optree

from .problems import PROBLEMS, Problem, get_problem
from .reference import Trajectory
from .scenarios import _LR, STEPS

__all__ = [
    "RHO",
    "ASAM_RHO",
    "sgd_lr",
    "gradnorm_sam_trajectory",
    "optax_sam_trajectory",
    "pytorch_optimizer_sam_trajectory",
    "pytorch_optimizer_float32_scale",
    "max_relative_deviation",
    "norm_eps_bound",
    "float32_norm_bound",
    "ComparisonRow",
    "compare_external",
    "format_table",
]

RHO = 0.05  # the SAM radius of the conformance scenarios
ASAM_RHO = 0.5  # the ASAM radius of the conformance scenarios (eta = 0 here, see the module doc)
U32 = 2.0**-24  # float32 unit round-off

# Tolerances (relative, on the whole flat parameter vector, max over the 21 recorded points).
TOL_EXACT = 1e-12  # float64 implementations of the same formula: round-off only
# The other tolerances are computed per run from the trajectory: ``TOL_EXACT + norm_eps_bound(...)``
# for gradnorm's default norm_eps against optax, ``TOL_EXACT + float32_norm_bound(...)`` for plain
# gradnorm against pytorch_optimizer (see those functions).


def sgd_lr(problem: str | Problem) -> float:
    """The plain-SGD learning rate of the problem's conformance scenarios."""
    name = problem if isinstance(problem, str) else problem.name
    return _LR[name][0]


def _problem(problem: str | Problem) -> Problem:
    return get_problem(problem) if isinstance(problem, str) else problem


def _flat(leaves: list[Any]) -> np.ndarray:
    return np.concatenate([np.reshape(np.asarray(a, dtype=np.float64), (-1,)) for a in leaves])


# ------------------------------------------------------------------------------------------
# JAX


def _x64():
    import jax

    return jax.enable_x64(True) if hasattr(jax, "enable_x64") else jax.experimental.enable_x64()


def _jax_setup(problem: Problem):
    import jax
    import jax.numpy as jnp

    data = {k: jnp.asarray(v, dtype=jnp.float64) for k, v in problem.data.items()}

    def loss(params: Any) -> Any:
        return problem.loss(jnp, params, data)

    params = optree.tree_map(lambda a: jnp.asarray(a, dtype=jnp.float64), problem.params0())
    return jax.value_and_grad(loss), jax.grad(loss), params


def _jax_gradnorm(problem: Problem, rho: float, lr: float, steps: int, norm_eps: float,
                  adaptive: bool, eta: float, jit: bool) -> Trajectory:
    import jax
    import optax

    import gradnorm

    with _x64():
        value_and_grad, _, params = _jax_setup(problem)
        rule = gradnorm.rules.get("sam", rho=rho, adaptive=adaptive, eta=eta, norm_eps=norm_eps)
        opt = optax.sgd(lr)

        def one_step(params, opt_state):
            res = gradnorm.step(params, value_and_grad, rule=rule)
            updates, opt_state = opt.update(res.grad, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, res.loss

        step = jax.jit(one_step) if jit else one_step
        opt_state = opt.init(params)
        record, losses = [_flat(optree.tree_leaves(params))], []
        for _ in range(steps):
            params, opt_state, loss = step(params, opt_state)
            record.append(_flat(optree.tree_leaves(params)))
            losses.append(float(loss))
    return Trajectory(np.array(record), np.array(losses))


def optax_sam_trajectory(problem: str | Problem, rho: float = RHO, lr: float | None = None,
                         steps: int = STEPS, *, jit: bool = True) -> Trajectory:
    """``optax.contrib.sam`` (opaque mode, ``sync_period=2``: one ascent step, then the outer
    ``optax.sgd(lr)`` update at the unperturbed params) in float64 JAX."""
    import jax
    import optax

    problem = _problem(problem)
    lr = sgd_lr(problem) if lr is None else lr
    with _x64():
        value_and_grad, grad, params = _jax_setup(problem)
        opt = optax.contrib.sam(
            optax.sgd(lr),
            optax.chain(optax.contrib.normalize(), optax.sgd(rho)),
            sync_period=2,
            opaque_mode=True,
        )

        def adv_grad_fn(p: Any, i: int) -> Any:  # the gradient at the i-th adversarial point
            del i
            return grad(p)

        def one_step(params, state):
            loss, g = value_and_grad(params)
            updates, state = opt.update(g, state, params, grad_fn=adv_grad_fn)
            return optax.apply_updates(params, updates), state, loss

        step = jax.jit(one_step) if jit else one_step
        state = opt.init(params)
        record, losses = [_flat(optree.tree_leaves(params))], []
        for _ in range(steps):
            params, state, loss = step(params, state)
            record.append(_flat(optree.tree_leaves(params)))
            losses.append(float(loss))
    return Trajectory(np.array(record), np.array(losses))


# ------------------------------------------------------------------------------------------
# PyTorch


def _torch_setup(problem: Problem):
    """Float64 leaf tensors of ``params0`` and ``grad_fn(tree) -> (loss, grads)`` by autograd."""
    import array_api_compat
    import torch

    data = {k: torch.as_tensor(np.array(v), dtype=torch.float64) for k, v in problem.data.items()}
    xp = array_api_compat.array_namespace(next(iter(data.values())))
    params = optree.tree_map(lambda a: torch.as_tensor(np.array(a), dtype=torch.float64), problem.params0())
    treedef = optree.tree_structure(params)

    def loss_of(leaves: list[Any]) -> Any:
        return problem.loss(xp, optree.tree_unflatten(treedef, leaves), data)

    def grad_fn(tree: Any) -> tuple[Any, Any]:
        with torch.enable_grad():
            leaves = [leaf.detach().requires_grad_(True) for leaf in optree.tree_leaves(tree)]
            loss = loss_of(leaves)
            grads = torch.autograd.grad(loss, leaves)
        return loss.detach(), optree.tree_unflatten(treedef, list(grads))

    return params, grad_fn, loss_of


def pytorch_optimizer_float32_scale(leaves: list[Any], grads: list[Any], rho: float, adaptive: bool,
                                    perturb_eps: float = 1e-12) -> Any:
    """pytorch_optimizer's ``SAM.first_step`` scale ``rho / (sqrt(sum ||v_i||^2) + perturb_eps)``,
    with the same torch operations and precisions as ``get_global_gradient_norm``: per-tensor
    norms in the tensors' dtype, then cast to float32, squared, summed, sqrt and eps in float32;
    a float32 0-d tensor. ``v_i = g_i`` or ``|w_i| g_i`` (adaptive)."""
    import torch

    with torch.no_grad():
        vs = [g * p.abs() if adaptive else g for p, g in zip(leaves, grads)]
        norms = torch._foreach_norm(vs)  # as get_global_gradient_norm (float64 CPU tensors)
        squared = torch.stack(norms).float().square_()
        norm = squared.sum().reshape(1).sqrt_().squeeze_(0).add_(perturb_eps)
        return rho / norm


def _torch_gradnorm(problem: Problem, rho: float, lr: float, steps: int, norm_eps: float,
                    adaptive: bool, eta: float, emulate_float32_norm: bool) -> Trajectory:
    import torch

    import gradnorm

    params, grad_fn, _ = _torch_setup(problem)
    leaves = optree.tree_leaves(params)
    opt = torch.optim.SGD(leaves, lr=lr)
    record, losses = [_flat([p.numpy() for p in leaves])], []
    for _ in range(steps):
        step_rho, step_eps = rho, norm_eps
        if emulate_float32_norm:
            if eta != 0:
                raise ValueError(f"`eta` must be 0 with `emulate_float32_norm=True`. Received: {eta!r}.")
            # pytorch_optimizer's perturbation is scale * v with a float32 scale; gradnorm's is
            # rho v / (||v|| + eps): rho_k = scale * ||v|| (float64) and eps = 0 give the same e.
            _, g = grad_fn(params)
            g = optree.tree_leaves(g)
            scale = float(pytorch_optimizer_float32_scale(leaves, g, rho, adaptive))
            v = [gi * p.abs() if adaptive else gi for p, gi in zip(leaves, g)]
            step_rho = scale * float(torch.sqrt(sum(torch.sum(vi * vi) for vi in v)))
            step_eps = 0.0
        res = gradnorm.step(params, grad_fn, rule="sam", rho=step_rho, adaptive=adaptive, eta=eta, norm_eps=step_eps)
        for p, d in zip(leaves, optree.tree_leaves(res.grad)):
            p.grad = d
        opt.step()
        record.append(_flat([p.detach().numpy() for p in leaves]))
        losses.append(float(res.loss))
    return Trajectory(np.array(record), np.array(losses))


def pytorch_optimizer_sam_trajectory(problem: str | Problem, rho: float = RHO, lr: float | None = None,
                                     steps: int = STEPS, *, adaptive: bool = False,
                                     perturb_eps: float = 1e-12) -> Trajectory:
    """``pytorch_optimizer.SAM(params, torch.optim.SGD, rho=rho, lr=lr, adaptive=...)`` in float64,
    driven by its closure API (gradients at the current weights first, then ``step(closure)``)."""
    import torch
    from pytorch_optimizer import SAM

    problem = _problem(problem)
    lr = sgd_lr(problem) if lr is None else lr
    params, _, loss_of = _torch_setup(problem)
    leaves = [p.requires_grad_(True) for p in optree.tree_leaves(params)]
    opt = SAM(leaves, torch.optim.SGD, rho=rho, adaptive=adaptive, perturb_eps=perturb_eps, lr=lr)

    def closure() -> Any:  # loss and gradients at the perturbed weights
        opt.zero_grad()
        loss = loss_of(leaves)
        loss.backward()
        return loss

    record, losses = [_flat([p.detach().numpy() for p in leaves])], []
    for _ in range(steps):
        opt.zero_grad()
        with torch.enable_grad():
            loss = loss_of(leaves)
            loss.backward()
        opt.step(closure)
        record.append(_flat([p.detach().numpy() for p in leaves]))
        losses.append(float(loss.detach()))
    return Trajectory(np.array(record), np.array(losses))


# ------------------------------------------------------------------------------------------
# gradnorm and the comparison


def gradnorm_sam_trajectory(problem: str | Problem, rho: float = RHO, lr: float | None = None,
                            steps: int = STEPS, *, backend: str = "jax", norm_eps: float = 1e-12,
                            adaptive: bool = False, eta: float = 0.0, jit: bool = True,
                            emulate_float32_norm: bool = False) -> Trajectory:
    """gradnorm's ``sam`` through ``gradnorm.step`` with plain SGD, in float64.

    ``backend="jax"``: JAX arrays, ``jax.value_and_grad``, ``optax.sgd`` (``jit`` the step or not).
    ``backend="torch"``: torch tensors, autograd, ``torch.optim.SGD``. ``emulate_float32_norm``
    (torch only, ``eta=0``) reproduces pytorch_optimizer's float32 perturbation scale through a
    per-step ``rho`` (see the module docstring); the driver then evaluates the gradient at the
    current params once more per step to compute that ``rho``.
    """
    problem = _problem(problem)
    lr = sgd_lr(problem) if lr is None else lr
    if backend == "jax":
        if emulate_float32_norm:
            raise ValueError("`emulate_float32_norm` must be False with `backend='jax'`. Received: True.")
        return _jax_gradnorm(problem, rho, lr, steps, norm_eps, adaptive, eta, jit)
    if backend == "torch":
        return _torch_gradnorm(problem, rho, lr, steps, norm_eps, adaptive, eta, emulate_float32_norm)
    raise ValueError(f"`backend` must be 'jax' or 'torch'. Received: {backend!r}.")


def max_relative_deviation(a: Trajectory, b: Trajectory) -> float:
    """``max_k ||a_k - b_k|| / ||b_k||`` over the recorded parameter vectors (Euclidean norms)."""
    if a.params.shape != b.params.shape:
        raise ValueError(f"`a` and `b` must have the same shape. Received: {a.params.shape} and {b.params.shape}.")
    diff = np.linalg.norm(a.params - b.params, axis=1)
    return float(np.max(diff / np.linalg.norm(b.params, axis=1)))


def _unflatten(problem: Problem):
    leaves0, treedef = optree.tree_flatten(problem.params0())
    sizes = [int(np.size(a)) for a in leaves0]

    def unflat(x: np.ndarray) -> Any:
        parts, start = [], 0
        for a, n in zip(leaves0, sizes):
            parts.append(np.reshape(x[start:start + n], np.shape(a)))
            start += n
        return optree.tree_unflatten(treedef, parts)

    return unflat


def _grads_and_curvatures(trajectory: Trajectory, problem: Problem) -> tuple[list[np.ndarray], list[float]]:
    """At every point where a step starts: the NumPy float64 gradient (flat) and ``||H||`` by
    30 power iterations with the problem's analytic HVP."""
    unflat = _unflatten(problem)
    grads, curvatures = [], []
    for x in trajectory.params[:-1]:
        p = unflat(x)
        _, g = problem.grad(p, problem.data)
        grads.append(_flat(optree.tree_leaves(g)))
        v = np.random.default_rng(0).normal(size=x.shape)
        lam = 0.0
        for _ in range(30):
            v = v / np.linalg.norm(v)
            v = _flat(optree.tree_leaves(problem.hvp(p, unflat(v), problem.data)))
            lam = float(np.linalg.norm(v))
        curvatures.append(lam)
    return grads, curvatures


def _propagated(trajectory: Trajectory, lr: float, curvatures: list[float], perturbation_errors: list[float]) -> float:
    """First-order size of the relative trajectory difference caused by perturbation errors
    ``de_k`` (absolute, per step): the direction moves by ``||H_k|| de_k``, the parameters by
    ``lr ||H_k|| de_k``; summed over the steps with a factor 2 for the growth of earlier
    differences along the run (SGD with ``lr ||H|| < 2`` does not expand them; the SAM
    perturbation's own Jacobian ``rho ||H||^2 / ||g||`` adds a few percent per step here), and
    divided by the smallest parameter norm on the run."""
    total = sum(lr * lam * de for lam, de in zip(curvatures, perturbation_errors))
    return 2.0 * total / float(np.min(np.linalg.norm(trajectory.params, axis=1)))


def norm_eps_bound(trajectory: Trajectory, problem: str | Problem, rho: float = RHO, lr: float | None = None,
                   norm_eps: float = 1e-12) -> float:
    """How far ``norm_eps`` alone can move gradnorm's SAM trajectory from an epsilon-free one
    (relative, first order): step k's perturbation ``rho g/(||g|| + eps)`` differs from
    ``rho g/||g||`` by ``rho eps/(||g_k|| + eps) <= rho eps/||g_k||``."""
    problem = _problem(problem)
    lr = sgd_lr(problem) if lr is None else lr
    grads, curvatures = _grads_and_curvatures(trajectory, problem)
    errors = [rho * norm_eps / float(np.linalg.norm(g)) for g in grads]
    return _propagated(trajectory, lr, curvatures, errors)


# Relative error of pytorch_optimizer's float32 scale rho / (sqrt(sum_i ||g_i||^2) + eps), in float32
# round-offs u = 2^-24, for k <= 6 leaves: cast of each norm to float32 (u), square (doubles it, +u),
# sum of k positive terms ((k-1) u), sqrt (halves all that, +u), + eps (u), then Python-float / tensor,
# which torch evaluates as reciprocal(norm) * rho in float32 (u + u, rho itself rounded: u):
# (3 + 5)/2 + 5 = 9 u; 10 u is used.
FLOAT32_SCALE_REL_ERR = 10 * U32


def float32_norm_bound(trajectory: Trajectory, problem: str | Problem, rho: float = RHO, lr: float | None = None,
                       adaptive: bool = False) -> float:
    """How far pytorch_optimizer's float32 perturbation scale can move a float64 SAM trajectory
    (relative, first order): the perturbation ``e_k`` is off by ``FLOAT32_SCALE_REL_ERR * ||e_k||``,
    with ``||e_k|| = rho`` (SAM) or ``rho ||w^2 g|| / || |w| g ||`` (ASAM)."""
    problem = _problem(problem)
    lr = sgd_lr(problem) if lr is None else lr
    grads, curvatures = _grads_and_curvatures(trajectory, problem)
    errors = []
    for x, g in zip(trajectory.params[:-1], grads):
        size = rho * float(np.linalg.norm(x * x * g) / np.linalg.norm(np.abs(x) * g)) if adaptive else rho
        errors.append(FLOAT32_SCALE_REL_ERR * size)
    return _propagated(trajectory, lr, curvatures, errors)


class ComparisonRow(NamedTuple):
    problem: str
    reference: str
    deviation: float  # max relative deviation of the parameter trajectories
    tolerance: float
    passed: bool


def _row(problem: str, reference: str, a: Trajectory, b: Trajectory, tolerance: float) -> ComparisonRow:
    dev = max_relative_deviation(a, b)
    return ComparisonRow(problem, reference, dev, tolerance, bool(dev <= tolerance))


def compare_external(problems: list[str] | None = None, steps: int = STEPS) -> list[ComparisonRow]:
    """Every comparison of this module, one row each; references that are not installed are left out."""
    import importlib.util

    have_optax = all(importlib.util.find_spec(m) is not None for m in ("optax", "jax"))
    have_po = all(importlib.util.find_spec(m) is not None for m in ("pytorch_optimizer", "torch"))
    rows: list[ComparisonRow] = []
    for name in problems or list(PROBLEMS):
        if have_optax:
            ref = optax_sam_trajectory(name, RHO, steps=steps)
            gn0 = gradnorm_sam_trajectory(name, RHO, steps=steps, backend="jax", norm_eps=0.0)
            rows.append(_row(name, "optax.contrib.sam, gradnorm norm_eps=0", gn0, ref, TOL_EXACT))
            gn = gradnorm_sam_trajectory(name, RHO, steps=steps, backend="jax")
            tol = TOL_EXACT + norm_eps_bound(ref, name, RHO)
            rows.append(_row(name, "optax.contrib.sam, gradnorm norm_eps=1e-12", gn, ref, tol))
        if have_po:
            for adaptive, rho, label in ((False, RHO, "SAM"), (True, ASAM_RHO, "SAM(adaptive=True)")):
                ref = pytorch_optimizer_sam_trajectory(name, rho, steps=steps, adaptive=adaptive)
                gn = gradnorm_sam_trajectory(name, rho, steps=steps, backend="torch", adaptive=adaptive)
                tol = TOL_EXACT + float32_norm_bound(ref, name, rho, adaptive=adaptive)
                rows.append(_row(name, f"pytorch_optimizer.{label}", gn, ref, tol))
                em = gradnorm_sam_trajectory(name, rho, steps=steps, backend="torch", adaptive=adaptive,
                                             emulate_float32_norm=True)
                rows.append(_row(name, f"pytorch_optimizer.{label}, float32 norm emulated", em, ref, TOL_EXACT))
    return rows


def format_table(rows: list[ComparisonRow]) -> str:
    lines = ["| problem | reference | max rel. deviation | tolerance | passed |", "|---|---|---|---|---|"]
    for r in rows:
        passed = "yes" if r.passed else "NO"
        lines.append(f"| {r.problem} | {r.reference} | {r.deviation:.2e} | {r.tolerance:.1e} | {passed} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(format_table(compare_external()))


def table_rows(rows: list[ComparisonRow]) -> list[dict[str, Any]]:
    """The comparisons as rows of the suite's backend x rule table (one line per reference)."""
    out = []
    for r in rows:
        rule = "sam(adaptive)" if "adaptive" in r.reference else "sam"
        out.append({
            "backend": "external: " + r.reference.replace("(adaptive=True)", "").replace(", gradnorm norm_eps=1e-12", "")
            .replace(", gradnorm", ", gradnorm's").replace("float32 norm emulated", "its float32 norm emulated"),
            "dtype": "float64",
            "rule": rule, "passed": bool(r.passed), "max_deviation": float(r.deviation),
            "tolerance": float(r.tolerance), "scenario": f"{r.problem}: {r.reference}",
            "message": f"sam vs {r.reference} on problem '{r.problem}': max relative deviation {r.deviation:.2e} "
                       f"(tolerance {r.tolerance:.1e})",
        })
    return out
