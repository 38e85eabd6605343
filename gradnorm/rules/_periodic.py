"""Periodic rules: a multi-pass rule every k steps, the plain (or LookSAM-corrected) gradient between."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import array_api_compat

from .._errors import describe
from .._tree import PerLeaf, namespace_of, per_leaf, placement, traced_cond
from ._base import Hyperparameter, HyperparameterError, Rule, choice, flag, integer, is_static_zero, real
from ._sam import SAM

__all__ = ["Periodic", "LookSAM", "PeriodicState"]


class PeriodicState(NamedTuple):
    """The state of `Periodic` and `LookSAM`, a tree of arrays.

    Attributes:
        inner: the wrapped rule's state (advanced on the full steps only).
        step: a 0-d int32 count of the steps taken; a step is full when ``step % every == 0``, so
            the first step is. It lives in host memory for PyTorch (deciding the branch reads it
            there without waiting for the device) and on the parameters' device elsewhere.
        reuse: with reuse (LookSAM), one array per parameter leaf: ``g_v / (||g_v|| + eps)``, where
            ``g_v`` is the part of the last full step's direction orthogonal to that step's gradient
            (scaled to unit length, globally or per leaf, so that a skipped step needs no norm of it);
            ``[]`` without reuse.
    """

    inner: Any
    step: Any
    reuse: list[Any]


def _rule_config(value: Any) -> bool:
    return isinstance(value, Mapping) and set(value) == {"rule", "hyperparameters"}


def _inner_rule(rule: str, name: str, value: Any) -> Rule:
    """The `inner` validator: a `Rule`, a registered name, or a config ``{"rule": ..., "hyperparameters":
    {...}}`` (from `Rule.to_config`), which must spend more than one gradient evaluation per step."""
    from . import from_config, get  # the package registry (imported here: the package imports this module)

    expectation = (
        "a gradnorm.rules.Rule that evaluates the gradient at other points than theta (sam, gnp, fd_gr, gam, "
        "or your own), a registered rule name, or a config {'rule': name, 'hyperparameters': {...}}"
    )
    if isinstance(value, Rule):
        inner = value
    elif isinstance(value, str) or _rule_config(value):
        try:
            inner = get(value) if isinstance(value, str) else from_config(value)
        except (ValueError, TypeError) as err:  # an unknown name, a bad or missing hyperparameter
            raise HyperparameterError(f"`{name}` of rule '{rule}' must be {expectation}; building it failed: {err}") from None
    else:
        raise HyperparameterError(f"`{name}` of rule '{rule}' must be {expectation}. Received: {describe(value)}.")
    if isinstance(inner, _PeriodicRule):
        raise HyperparameterError(
            f"`{name}` of rule '{rule}' must not be a periodic rule itself (nothing is gained by nesting them: "
            f"give the outer rule the product of the periods). Received: {inner!r}."
        )
    if inner.needs_hvp:
        raise HyperparameterError(
            f"`{name}` of rule '{rule}' cannot be rule '{inner.name}', which needs a Hessian-vector product: its first "
            f"pass must keep the graph (create_graph) at every step whether the product is taken or not, so skipping it "
            f"saves little, and the HVP does not fit the reuse of a perturbed gradient. Wrap 'fd_gr', the same update from "
            f"gradients only. Received: {inner!r}."
        )
    if inner.grad_evals < 2 and not _zero_strength(inner):
        raise HyperparameterError(
            f"`{name}` of rule '{rule}' must spend more than one gradient evaluation per step: rule '{inner.name}' "
            f"costs one at every step, so there is nothing to skip; use it directly. Received: {inner!r}."
        )
    return inner


_inner_rule.expectation = "a gradnorm.rules.Rule of two or more gradient evaluations"  # type: ignore[attr-defined]


def _zero_strength(inner: Rule) -> bool:
    """A multi-pass rule at zero strength (one of its radii or strengths, its `leafwise`
    hyperparameters, is the Python number 0): one evaluation per step, the plain gradient."""
    return any(h.leafwise and is_static_zero(inner.config[h.name]) for h in type(inner).spec())


class _PeriodicRule(Rule):
    """The machinery of `Periodic` and `LookSAM`: subclasses set `_inner`, `_every`, `_reuse` (whether
    the state keeps ``g_v``), `_alpha` and `_decomposition` in their constructor."""

    state_type = PeriodicState

    _inner: Rule
    _every: int
    _reuse: bool
    _alpha: Any
    _decomposition: str

    def _set(self, inner: Rule, every: int, reuse: bool, alpha: Any, decomposition: str) -> None:
        for key, value in (("_inner", inner), ("_every", every), ("_reuse", reuse), ("_alpha", alpha),
                           ("_decomposition", decomposition)):
            object.__setattr__(self, key, value)

    # -- static shapes of the step ----------------------------------------------------------
    def _trivial(self) -> bool:
        """The wrapped rule is at zero strength: every step is the plain gradient, after one evaluation."""
        return self._inner.grad_evals < 2

    def _reusing(self) -> bool:
        """The skipped steps add the stored ``g_v`` (not for ``every=1``, where no step is skipped,
        nor at ``alpha=0``, where they are the plain gradient)."""
        return self._reuse and not self._trivial() and self._every > 1 and not is_static_zero(self._alpha)

    # -- cost ---------------------------------------------------------------------------------
    @property
    def grad_evals(self) -> int:
        """The most one step costs: the wrapped rule's cost, at the full steps."""
        return self._inner.grad_evals

    @property
    def hvp_evals(self) -> int:
        return self._inner.hvp_evals

    @property
    def mean_grad_evals(self) -> float:
        """``(inner.grad_evals + every - 1) / every``: one full step and ``every - 1`` single
        evaluations per period (``(k + 1) / k`` for a two-pass rule)."""
        return (self._inner.grad_evals + self._every - 1) / self._every

    @property
    def uses_grad_norm(self) -> bool:
        """Every step reads ``||g||`` with the global reuse (and with ``every=1`` if the wrapped rule does);
        otherwise the full steps compute it where the wrapped rule needs it, and the skipped steps
        do without (an optimizer that asks for no norms saves that reduction there)."""
        if self._trivial():
            return False
        if self._every == 1:
            return self._inner.uses_grad_norm
        return self._reusing() and self._decomposition == "global"

    # -- checks of the wrapped rule's values, as its own update_leaves would make them ---------
    def _check_per_leaf_values(self, n: int, treedef: Any = None) -> None:
        super()._check_per_leaf_values(n, treedef)
        self._inner._check_per_leaf_values(n, treedef)

    def update_leaves(self, params, state, oracle, **kwargs):  # noqa: D102 - Rule.update_leaves
        if isinstance(state, PeriodicState) and not isinstance(state.inner, self._inner.state_type):
            raise TypeError(
                f"`state.inner` of rule '{self.name}' must be a {self._inner.state_type.__name__} (the state of rule "
                f"'{self._inner.name}'; from `rule.init(params)` or the previous step). Received: {describe(state.inner)}."
            )
        inner = self._inner
        if inner._array_hyperparameters:  # type: ignore[attr-defined]
            ops = kwargs.get("ops")
            xp = ops.xp if ops is not None else namespace_of(params)
            if id(xp) not in inner._namespaces_checked:  # type: ignore[attr-defined]
                inner._check_array_hyperparameters(xp)
        return super().update_leaves(params, state, oracle, **kwargs)

    # -- the two pure functions -----------------------------------------------------------------
    def init_leaves(self, params, ops):
        xp = ops.xp
        # PyTorch: the counter stays in host memory, so that choosing the branch (`bool(step % k == 0)`)
        # does not wait for the device; elsewhere it sits with the parameters (JAX keys its compilation
        # cache on where the arguments are committed, and the branch is traced there anyway).
        device = "cpu" if array_api_compat.is_torch_namespace(xp) else placement(params[0])
        step = xp.zeros((), dtype=xp.int32, device=device)
        reuse = [xp.zeros_like(p) for p in params] if self._reuse else []
        return PeriodicState(self._inner.init_leaves(params, ops), step, reuse)

    def compute_direction(self, params, grads, loss, grad_norm, state, oracle, ops):
        xp = ops.xp
        inner = self._inner
        full = (state.step % self._every) == 0
        new_step = state.step + 1
        if self._trivial():  # zero strength: the plain gradient at every step
            return grads, PeriodicState(state.inner, new_step, state.reuse), {"full_step": full, "grad_evals": 0}
        if self._every == 1:  # every step is full: the wrapped rule, bit for bit
            direction, inner_state, inner_info = inner.compute_direction(
                params, grads, loss, grad_norm, state.inner, oracle, ops
            )
            info = {"full_step": full}
            if "grad_evals" in inner_info:  # a wrapped rule of varying cost (a 0-d array strength at 0)
                info["grad_evals"] = inner_info["grad_evals"]
            return direction, PeriodicState(inner_state, new_step, state.reuse), info
        reusing = self._reusing()
        # Both branches traced (jax.jit, tf.function) share `grads`, and the reuse reads it after the
        # wrapped rule: then that rule gets its own list, whose elements it may release (donate to the
        # oracle). Eagerly without reuse it gets `grads` itself, so that a donation frees the first
        # gradient before the second pass, as when the rule runs alone.
        traced = traced_cond(full) is not None
        keep_grads = reusing or traced
        if traced:  # an oracle's lazily made values (the side state of the first pass) must not be a branch's
            oracle.prepare_traced_branches()
        before = oracle.grad_evals
        ran: list[bool] = []
        reported: list[Any] = []  # what the wrapped rule reported it spent (a rule of varying cost)

        def full_step() -> tuple[Any, ...]:
            ran.append(True)
            norm = ops.norm(grads) if grad_norm is None and inner.uses_grad_norm else grad_norm
            direction, inner_state, inner_info = inner.compute_direction(
                params, list(grads) if keep_grads else grads, loss, norm, state.inner, oracle, ops
            )
            kept = self._unit_orthogonal_part(direction, grads, ops) if reusing else state.reuse
            spent = inner_info.get("grad_evals", oracle.grad_evals - before)
            if traced:  # a value of this branch: an output of the conditional
                return direction, inner_state, kept, xp.astype(xp.asarray(spent), xp.int32)
            reported.append(spent)
            return direction, inner_state, kept

        def other_step() -> tuple[Any, ...]:
            ran.append(False)
            direction = self._with_reuse(grads, grad_norm, state.reuse, ops) if reusing else grads
            if traced:
                return direction, state.inner, state.reuse, xp.astype(xp.asarray(0), xp.int32)
            return direction, state.inner, state.reuse

        if traced:  # both branches traced (jax.jit, tf.function): what ran depends on the predicate
            direction, inner_state, kept, spent_now = ops.cond(full, full_step, other_step, like=grads)
        else:
            direction, inner_state, kept = ops.cond(full, full_step, other_step, like=grads)
            spent_now = reported[0] if ran == [True] else 0
        info = {"full_step": full, "grad_evals": spent_now}
        return direction, PeriodicState(inner_state, new_step, kept), info

    # -- LookSAM's decomposition ------------------------------------------------------------
    def _unit_orthogonal_part(self, direction: list[Any], grads: list[Any], ops) -> list[Any]:
        r"""$u = g_v / (\lVert g_v\rVert + \epsilon)$, where $g_v = d - \frac{\langle g, d\rangle}{\lVert g\rVert^2 +
        \epsilon^2}\, g$ is the part of the full step's direction $d$ orthogonal to the gradient (LookSAM's
        $g_s - \lVert g_s\rVert \cos(g, g_s)\, g/\lVert g\rVert$), globally or per leaf.

        The state keeps $g_v$ scaled to unit length (up to $\epsilon$), so that a skipped step,
        $g + \alpha \lVert g\rVert\, u$, needs no norm of it: the same as
        $g + \alpha \lVert g\rVert / (\lVert g_v\rVert + \epsilon)\, g_v$, up to rounding.

        $\epsilon^2$ (`norm_eps` squared) keeps a zero gradient finite without leaving a spurious
        parallel part of relative size $2\epsilon/\lVert g\rVert$ (which $(\lVert g\rVert + \epsilon)^2$ would,
        and which the scaling to unit length would blow up where the true $g_v$ is 0). Per leaf, a leaf
        of one element has no orthogonal part: its $u$ is 0, exactly."""
        eps = self.norm_eps
        eps2 = eps * eps
        if self._decomposition == "global":
            gv = ops.axpy(-(ops.vdot(grads, direction) / (ops.vdot(grads, grads) + eps2)), grads, direction)
            return ops.scale(1.0 / (ops.norm(gv) + eps), gv)
        sized = [math.prod(g.shape) > 1 for g in grads]
        coefficients = tuple(
            -(ops.vdot([g], [d]) / (ops.vdot([g], [g]) + eps2)) if big else 0.0
            for g, d, big in zip(grads, direction, sized)
        )
        gv = ops.axpy(PerLeaf._make(coefficients), grads, direction)
        scales = tuple(1.0 / (ops.norm([v]) + eps) if big else 0.0 for v, big in zip(gv, sized))
        return ops.scale(PerLeaf._make(scales), gv)

    def _with_reuse(self, grads: list[Any], grad_norm: Any, unit: list[Any], ops) -> list[Any]:
        r"""$g + \alpha\, \lVert g\rVert\, u$ with $u$ the stored unit $g_v$, globally or per leaf (a leaf
        of one element: $g$)."""
        if self._decomposition == "global":
            return ops.axpy(self._alpha * grad_norm, unit, grads)
        coefficients = tuple(
            a * ops.norm([g]) if math.prod(g.shape) > 1 else 0.0
            for a, g in zip(per_leaf(self._alpha, len(grads)), grads)
        )
        return ops.axpy(PerLeaf._make(coefficients), unit, grads)


_ALPHA_DOC = "weight of the reused g_v, scaled to ||g||, on the skipped steps; 0.7 in the LookSAM code we know of"
_DECOMPOSITION_DOC = (
    "'global': g_v and its scale over all parameters, as in the paper's algorithm; 'per_tensor': per "
    "parameter leaf, as in the PyTorch LookSAM implementations"
)


class Periodic(_PeriodicRule):
    r"""A multi-pass rule at every `every`-th step, the plain gradient (or, with `reuse`, the LookSAM
    correction) at the others.

    With $t$ the step count (from 0) and $k$ = `every`:

    $$
    d_t = \begin{cases} \text{inner}(\theta_t) & t \equiv 0 \pmod k \quad\text{(a full step)} \\
    g_t & \text{otherwise} \end{cases}
    $$

    `reuse=True` (LookSAM's idea for any inner rule): a full step also stores the part of its
    direction $d$ orthogonal to the gradient, $g_v = d - \langle\hat g, d\rangle\hat g$ with
    $\hat g = g/(\lVert g\rVert + \epsilon)$, and the other steps return
    $g + \alpha\, \lVert g\rVert / (\lVert g_v\rVert + \epsilon)\; g_v$. For `sam` this is LookSAM
    (`gradnorm.rules.LookSAM`). For `gnp` (and forward `fd_gr`) $g_v$ is, up to its scale, which
    the reuse normalizes away, the same as `sam`'s at the same ascent point, since their directions
    differ from the gradient there only along $g$ and in scale. `decomposition="per_tensor"` takes
    the projection and the scale leaf by leaf.

    Cost: the wrapped rule's evaluations at a full step, one at the others, so
    ``(inner.grad_evals + every - 1) / every`` per step on average (`mean_grad_evals`;
    ``(k + 1) / k`` for a two-pass rule); `grad_evals` declares the most one step costs, and
    ``info["grad_evals"]`` reports what each step spent, ``info["full_step"]`` which kind it was.
    The skipped work is really skipped, also traced: the branch is ``ops.cond``
    (``jax.lax.cond`` under ``jax.jit``, ``tf.cond`` under ``tf.function``; PyTorch and other eager
    libraries read the step counter, kept in host memory, to choose). The wrapped rule's own `info`
    entries are not reported (they exist on the full steps only, and `info` must have the same
    entries at every step).

    The wrapped rule (`inner`) must evaluate the gradient at other points than $\theta$: `sam`,
    `gnp`, `fd_gr`, `gam` or a rule of your own. One-pass rules (`sgd`, `flooding`, `coherent`)
    have nothing to skip and `gr` needs a Hessian-vector product: both are refused. At zero
    strength (`sam` with ``rho=0``) every step is the plain gradient, after one evaluation.
    ``every=1`` is the wrapped rule itself. The state (`PeriodicState`) is the wrapped rule's
    state, the step counter and, with `reuse`, one parameter-sized array per leaf.

    References:
        Foret, Kleiner, Mobahi, Neyshabur. [Sharpness-Aware Minimization for Efficiently Improving
        Generalization](https://arxiv.org/abs/2010.01412), ICLR 2021 (SAM; composer's SAM takes
        it every `interval` steps). Liu, Mai, Chen, Hsieh, You. [Towards Efficient and Scalable
        Sharpness-Aware Minimization](https://arxiv.org/abs/2203.02714), CVPR 2022 (the periodic
        "SAM-k" baseline, and LookSAM's reuse of $g_v$).
    """

    name = "periodic"
    hyperparameters = (
        Hyperparameter("inner", _inner_rule, doc="the wrapped rule (sam, gnp, fd_gr, gam, ...), taken at the full steps"),
        Hyperparameter("every", integer(1), doc="the period k: a full step when the step count is a multiple of k"),
        Hyperparameter("reuse", flag(), False, "LookSAM: add the stored orthogonal part g_v on the other steps"),
        Hyperparameter("alpha", real(0.0), 0.7, _ALPHA_DOC + " (with reuse=True)", leafwise=True),
        Hyperparameter("decomposition", choice("global", "per_tensor"), "global", _DECOMPOSITION_DOC + " (with reuse=True)"),
    )

    def __init__(self, inner: Any = None, **hyperparameters: Any):
        if inner is not None:
            if "inner" in hyperparameters:
                raise TypeError("Periodic() got `inner` twice (positionally and as a keyword).")
            hyperparameters["inner"] = inner
        super().__init__(**hyperparameters)
        if not self.reuse:  # a number or name that is not the default was meant for the reuse (an array is not read)
            for key in ("alpha", "decomposition"):
                default = next(h.default for h in self.hyperparameters if h.name == key)
                value = self.config[key]
                if isinstance(value, (float, str)) and value != default:
                    raise HyperparameterError(
                        f"`{key}` of rule 'periodic' is used only with reuse=True (the LookSAM correction on the "
                        f"skipped steps); without it those steps are the plain gradient. Received: {describe(value)} "
                        f"with reuse=False."
                    )
        self._set(self.inner, self.every, self.reuse, self.alpha, self.decomposition)


class LookSAM(_PeriodicRule):
    r"""LookSAM: SAM every `every` steps, its orthogonal part reused in between.

    With $t$ the step count (from 0), $k$ = `every` and $\hat g = g/(\lVert g\rVert + \epsilon)$:

    $$
    \begin{aligned}
    t \equiv 0 \pmod k:&\quad g_s = \nabla L\big(\theta + \rho \hat g\big), \quad
        g_v = g_s - \langle \hat g, g_s\rangle \hat g \ (= g_s - \lVert g_s\rVert\cos(g, g_s)\,\hat g), \quad d = g_s \\
    \text{otherwise:}&\quad d = g + \alpha\, \frac{\lVert g\rVert}{\lVert g_v\rVert + \epsilon}\, g_v
    \end{aligned}
    $$

    Two gradient evaluations at the full steps, one at the others: $(k+1)/k$ per step on average.
    The same as ``Periodic(SAM(rho=rho, adaptive=adaptive, eta=eta), every=every, reuse=True,
    alpha=alpha, decomposition=decomposition)``, with SAM's hyperparameters as its own (so that
    PyTorch parameter groups can carry `rho`, and a Keras config stores plain numbers); see
    `Periodic` for the branch, the cost reporting and the state. ``rho=0`` is the plain gradient.

    References:
        Liu, Mai, Chen, Hsieh, You. [Towards Efficient and Scalable Sharpness-Aware
        Minimization](https://arxiv.org/abs/2203.02714), CVPR 2022.
        Foret, Kleiner, Mobahi, Neyshabur. [Sharpness-Aware Minimization for Efficiently Improving
        Generalization](https://arxiv.org/abs/2010.01412), ICLR 2021.

    Differences from the code we know of (no official release was found; kozistr/pytorch_optimizer's
    ``LookSAM`` and Leminhbinh0209/LookSAM, both with ``alpha=0.7``):

        * pytorch_optimizer decomposes and rescales per parameter tensor (``decomposition="per_tensor"``
          here), the paper's algorithm and Leminhbinh0209/LookSAM over all parameters (the default here);
        * their epsilons differ (``1e-8`` added to ``||g_v||``, a clamp of the norms); gradnorm adds
          `norm_eps` to every norm that divides, as everywhere;
        * pytorch_optimizer counts steps with the base optimizer's step and defaults to ``k=10``; the
          paper reports k = 5 and 10 [the paper's own alpha could not be checked]; `every` has no
          default here.
    """

    name = "looksam"
    hyperparameters = (
        Hyperparameter("rho", real(0.0), doc="SAM's perturbation radius at the full steps", leafwise=True),
        Hyperparameter("every", integer(1), doc="the period k: a full SAM step when the step count is a multiple of k"),
        Hyperparameter("alpha", real(0.0), 0.7, _ALPHA_DOC, leafwise=True),
        Hyperparameter("decomposition", choice("global", "per_tensor"), "global", _DECOMPOSITION_DOC),
        Hyperparameter("adaptive", flag(), False, "ASAM's perturbation at the full steps"),
        Hyperparameter("eta", real(0.0), 0.0, "ASAM's offset in T = |theta| + eta", leafwise=True),
    )

    def __init__(self, **hyperparameters: Any):
        super().__init__(**hyperparameters)
        sam = SAM(rho=self.rho, adaptive=self.adaptive, eta=self.eta, norm_eps=self.norm_eps)
        self._set(sam, self.every, True, self.alpha, self.decomposition)
