"""The JAX adapter: ``gradnorm.jax.step`` (jitted and eager) and ``gradnorm.jax.transform``
(an optax transformation, its hyperparameters injected as arrays by ``optax.inject_hyperparams``)
around ``optax.sgd``.

XLA compilation dominates the cost of a jitted backend on these tiny problems (about a second
per program on a 2-core CPU), so the jitted backends compile **one program per problem and
dtype** that runs every scenario of the problem: for each rule setting, a ``lax.scan`` over
the base optimizers (plain SGD, then SGD with momentum: the learning rate and the momentum are
runtime values of one ``optax.sgd``; momentum 0 adds ``0 * buffer``, exactly plain SGD) around
a ``lax.scan`` over the 20 steps. The trajectories are computed on the first request and kept;
a scenario outside ``SCENARIOS`` gets a program of its own. The identity directions of a
problem are likewise one program.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import optree

import gradnorm

from ..identities import IDENTITIES
from ..problems import PROBLEMS, Problem
from ..reference import Trajectory
from ..scenarios import SCENARIOS, Scenario
from . import Backend, flat


def _x64(dtype: str):
    import jax

    if dtype == "float64":
        return jax.enable_x64(True) if hasattr(jax, "enable_x64") else jax.experimental.enable_x64()
    return contextlib.nullcontext()


def _setup(problem: Problem, dtype: str, params: Any = None):
    """``loss(params)`` on the problem's data in ``dtype``, and the initial parameters."""
    import jax.numpy as jnp

    data = {k: jnp.asarray(v, dtype=dtype) for k, v in problem.data.items()}

    def loss(p: Any) -> Any:
        return problem.loss(jnp, p, data)

    tree = optree.tree_map(lambda a: jnp.asarray(a, dtype=dtype), problem.params0() if params is None else params)
    return loss, tree


def _stack_flat(stacked: Any) -> np.ndarray:
    """A tree whose leaves have a leading step axis -> a (steps, n) float64 array."""
    leaves = [np.asarray(leaf, dtype=np.float64) for leaf in optree.tree_leaves(stacked)]
    return np.concatenate([leaf.reshape(leaf.shape[0], -1) for leaf in leaves], axis=1)


def _optimizer(scenario: Scenario) -> tuple[float, float]:
    return scenario.lr, scenario.momentum if scenario.optimizer == "momentum" else 0.0


class _JitBackend(Backend):
    """Shared by the jitted backends: one program per problem and dtype for the trajectories,
    one for the identity directions. Subclasses say how one step (``_trajectory``) and one
    direction (``_direction``) are computed, inside a trace."""

    requires = ("jax", "optax")

    def _trajectory(self, loss, params0, rule: str, hyper: dict, lr, momentum, steps: int):
        """Traced: the stacked parameters after each step and the losses, for one base optimizer."""
        raise NotImplementedError

    def _direction(self, loss, params, rule: str, hyper: dict):
        raise NotImplementedError

    # -- trajectories ---------------------------------------------------------------------
    def _run_group(self, scenarios: tuple[Scenario, ...], dtype: str) -> dict[Scenario, Trajectory]:
        import jax
        import jax.numpy as jnp

        problem = PROBLEMS[scenarios[0].problem]
        groups: dict[tuple, list[Scenario]] = {}
        for s in scenarios:
            groups.setdefault((s.rule, s.hyper, s.steps), []).append(s)
        with _x64(dtype):
            loss, params0 = _setup(problem, dtype)

            def program(params0):
                out = []
                for (rule, hyper, steps), members in groups.items():
                    configs = jnp.asarray([_optimizer(s) for s in members], dtype=dtype)

                    def one(config, rule=rule, hyper=hyper, steps=steps):
                        return self._trajectory(loss, params0, rule, dict(hyper), config[0], config[1], steps)

                    out.append(jax.lax.map(one, configs))
                return out

            results = jax.jit(program)(params0)
            first = flat([np.asarray(p) for p in optree.tree_leaves(params0)])
            trajectories = {}
            for (_, members), (stacked, losses) in zip(groups.items(), results):
                for i, s in enumerate(members):
                    after = _stack_flat(jax.tree_util.tree_map(lambda a, i=i: a[i], stacked))
                    trajectories[s] = Trajectory(np.vstack([first[None, :], after]),
                                                 np.asarray(losses[i], dtype=np.float64))
        return trajectories

    def _cached(self, key: tuple, compute: Any) -> Any:
        cache = self.__dict__.setdefault("_results", {})
        if key not in cache:
            cache[key] = compute()
        return cache[key]

    def _problem_trajectories(self, problem: str, dtype: str) -> dict[Scenario, Trajectory]:
        scenarios = tuple(s for s in SCENARIOS if s.problem == problem and self.covers(s))
        return self._cached(("trajectories", problem, dtype), lambda: self._run_group(scenarios, dtype))

    def run(self, scenario: Scenario, problem: Problem, dtype: str) -> Trajectory:
        cached = self._problem_trajectories(scenario.problem, dtype) if problem is PROBLEMS.get(scenario.problem) else {}
        if scenario in cached:
            return cached[scenario]
        return self._run_group((scenario,), dtype)[scenario]

    # -- identity directions ----------------------------------------------------------------
    def _directions(self, problem: Problem, pairs: tuple, dtype: str, params: Any = None) -> dict:
        import jax

        with _x64(dtype):
            loss, tree = _setup(problem, dtype, params)

            def program(p):
                return [self._direction(loss, p, rule, dict(hyper)) for rule, hyper in pairs]

            out = jax.jit(program)(tree)
            return {pair: flat([np.asarray(d) for d in optree.tree_leaves(o)]) for pair, o in zip(pairs, out)}

    def _identity_directions(self, problem: str, dtype: str) -> dict:
        pairs = []
        for identity in IDENTITIES:
            if identity.problem == problem:
                pairs += [p for p in (identity.lhs, identity.rhs) if p not in pairs]
        return self._cached(("identities", problem, dtype), lambda: self._directions(PROBLEMS[problem], tuple(pairs), dtype))

    def direction(self, problem, rule, hyper, dtype, params=None):
        pair = (rule, tuple(hyper.items()))
        if params is None and PROBLEMS.get(problem.name) is problem:
            cached = self._identity_directions(problem.name, dtype)
            if pair in cached:
                return cached[pair]
        return self._directions(problem, (pair,), dtype, params)[pair]


class JaxStepJit(_JitBackend):
    name = "jax-step-jit"
    description = "gradnorm.jax.step under jax.jit (lax.scan over the steps), optax.sgd"
    dtypes = ("float64", "float32")

    def _trajectory(self, loss, params0, rule, hyper, lr, momentum, steps):
        import jax
        import optax

        import gradnorm.jax as gj

        rule_obj = gradnorm.rules.get(rule, **hyper)
        opt = optax.sgd(lr, momentum=momentum)

        def body(carry, _):
            params, state, opt_state = carry
            res = gj.step(params, loss, rule=rule_obj, state=state)
            updates, opt_state = opt.update(res.grad, opt_state, params)
            params = optax.apply_updates(params, updates)
            return (params, res.state, opt_state), (params, res.loss)

        init = (params0, rule_obj.init(params0), opt.init(params0))
        return jax.lax.scan(body, init, None, length=steps)[1]

    def _direction(self, loss, params, rule, hyper):
        import gradnorm.jax as gj

        return gj.step(params, loss, rule=rule, **hyper).grad


class JaxTransform(_JitBackend):
    name = "jax-transform"
    description = ("optax.inject_hyperparams(gradnorm.jax.transform)(optax.sgd) under jax.jit, the gradient "
                   "from jax.value_and_grad passed as updates with value= and loss_fn=")
    # float64 only: its 1e-10 tolerance is the discriminating one, and jax-step-jit runs the same
    # rule code in float32 (each dtype costs a compilation per problem).
    dtypes = ("float64",)

    def _trajectory(self, loss, params0, rule, hyper, lr, momentum, steps):
        import jax
        import optax

        import gradnorm.jax as gj

        static = tuple(k for k, v in hyper.items() if isinstance(v, (bool, int, str)) and not isinstance(v, float))
        tx = optax.inject_hyperparams(gj.transform, static_args=static)(optax.sgd(lr, momentum=momentum), rule=rule, **hyper)
        value_and_grad = jax.value_and_grad(loss)

        def body(carry, _):
            params, state = carry
            value, grads = value_and_grad(params)
            updates, state = tx.update(grads, state, params, value=value, loss_fn=loss)
            params = optax.apply_updates(params, updates)
            return (params, state), (params, value)

        return jax.lax.scan(body, (params0, tx.init(params0)), None, length=steps)[1]

    def _direction(self, loss, params, rule, hyper):
        import jax
        import optax

        import gradnorm.jax as gj

        tx = gj.transform(optax.sgd(1.0), rule=rule, **hyper)  # updates = -1.0 * direction, exactly
        value, grads = jax.value_and_grad(loss)(params)
        updates, _ = tx.update(grads, tx.init(params), params, value=value, loss_fn=loss)
        return jax.tree_util.tree_map(lambda u: -u, updates)


class JaxStepEager(Backend):
    """``gradnorm.jax.step`` without jit: every operation dispatched eagerly."""

    name = "jax-step-eager"
    description = "gradnorm.jax.step, eager, optax.sgd; the logistic problem's plain-SGD scenarios"
    dtypes = ("float32",)
    requires = ("jax", "optax")

    def covers(self, scenario: Scenario) -> bool:
        # Eager dispatch re-traces the autodiff at every gradient (~30 ms per step here) and
        # compiles every operation once per new shape: the eager backend runs every rule setting
        # with plain SGD on the logistic problem (the cheapest per step; its tree has a 0-d
        # leaf). The jitted backends run every scenario; the rule code is the same.
        return scenario.problem == "logistic" and scenario.optimizer == "sgd"

    def run(self, scenario: Scenario, problem: Problem, dtype: str) -> Trajectory:
        import optax

        import gradnorm.jax as gj

        with _x64(dtype):
            loss, params = _setup(problem, dtype)
            rule = gradnorm.rules.get(scenario.rule, **scenario.hyperparameters)
            lr, momentum = _optimizer(scenario)
            opt = optax.sgd(lr, momentum=momentum or None)
            state, opt_state = None, opt.init(params)
            record, losses = [flat([np.asarray(p) for p in optree.tree_leaves(params)])], []
            for _ in range(scenario.steps):
                res = gj.step(params, loss, rule=rule, state=state)
                updates, opt_state = opt.update(res.grad, opt_state, params)
                params, state = optax.apply_updates(params, updates), res.state
                record.append(flat([np.asarray(p) for p in optree.tree_leaves(params)]))
                losses.append(float(res.loss))
        return Trajectory(np.array(record), np.array(losses))

    def direction(self, problem, rule, hyper, dtype, params=None):
        import gradnorm.jax as gj

        with _x64(dtype):
            loss, tree = _setup(problem, dtype, params)
            return flat([np.asarray(d) for d in optree.tree_leaves(gj.step(tree, loss, rule=rule, **hyper).grad)])


BACKENDS = [JaxStepJit(), JaxStepEager(), JaxTransform()]
