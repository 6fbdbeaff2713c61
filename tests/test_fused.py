"""The fused route (``value_grad_and_hessian_diag``) against the closure route, its
``lax.cond`` on non-refresh steps, compile-once training steps, and the benchmark's
``--quick`` smoke run."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import CompileCounter, assert_trees_allclose
from jax.extend import core as jax_core

import adahessian_jax as ah

ROOT = Path(__file__).resolve().parents[1]


def _batches(batch, n, seed=1):
  """``n`` different batches like ``batch`` (same shapes), so that steps differ."""
  x, y = batch
  r = np.random.default_rng(seed)
  return [(x + 0.1 * jnp.asarray(r.normal(size=x.shape)), y) for _ in range(n)]


def _with_aux(loss_fn):
  def loss_aux(p, batch):
    loss = loss_fn(p, batch)
    return loss, {"loss_x2": 2.0 * loss}

  return loss_aux


def _train(tx, params, step, batches, jit):
  """Runs ``step(params, state, batch) -> (params, state, loss)`` over ``batches``."""
  step = jax.jit(step) if jit else step
  st = tx.init(params)
  losses = []
  for batch in batches:
    params, st, loss = step(params, st, batch)
    losses.append(loss)
  return params, st, losses


def _run_closure(tx, params, loss_fn, batches, jit=True):
  def step(p, st, batch):
    loss, g = jax.value_and_grad(loss_fn)(p, batch)
    u, st = tx.update(g, st, p, value_fn=lambda q: loss_fn(q, batch))
    return optax.apply_updates(p, u), st, loss

  return _train(tx, params, step, batches, jit)


def _run_fused(tx, params, loss_fn, batches, has_aux=False, jit=True):
  vgh = ah.value_grad_and_hessian_diag(loss_fn, has_aux=has_aux)

  def step(p, st, batch):
    value, g, h = vgh(p, st, batch)
    u, st = tx.update(g, st, p, hessian_diag=h)
    loss = value[0] if has_aux else value
    return optax.apply_updates(p, u), st, loss

  return _train(tx, params, step, batches, jit)


def _assert_trees_close(a, b):
  assert_trees_allclose(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
  "update_freq,n_samples,has_aux",
  [(1, 1, False), (3, 1, False), (1, 2, False), (3, 2, True), (1, 1, True)],
)
def test_fused_and_closure_trajectories_match(mlp_problem, update_freq, n_samples, has_aux):
  params, loss_fn, batch = mlp_problem
  batches = _batches(batch, 7)
  tx = ah.adahessian(0.05, update_freq=update_freq, n_samples=n_samples, seed=3)
  p_c, st_c, loss_c = _run_closure(tx, params, loss_fn, batches)
  fused_loss = _with_aux(loss_fn) if has_aux else loss_fn
  p_f, st_f, loss_f = _run_fused(tx, params, fused_loss, batches, has_aux=has_aux)
  assert jax.tree.leaves(params)[0].dtype == jnp.float64
  # The run moved the parameters, so the comparison is not vacuous.
  assert not np.allclose(jax.tree.leaves(p_c)[1], jax.tree.leaves(params)[1])
  _assert_trees_close(p_f, p_c)
  _assert_trees_close(st_f, st_c)
  np.testing.assert_allclose(np.array(loss_f), np.array(loss_c), rtol=1e-13)


def test_fused_and_closure_trajectories_match_on_a_cnn(cnn_problem):
  params, loss_fn, batch = cnn_problem
  batches = _batches(batch, 5)
  tx = ah.adahessian(0.05, update_freq=2, n_samples=2, seed=1)
  p_c, _, _ = _run_closure(tx, params, loss_fn, batches)
  p_f, _, _ = _run_fused(tx, params, loss_fn, batches)
  _assert_trees_close(p_f, p_c)


def test_fused_matches_closure_outside_jit(mlp_problem):
  """Outside ``jit`` both routes pick the refresh steps in Python; same result."""
  params, loss_fn, batch = mlp_problem
  batches = _batches(batch, 3)
  tx = ah.adahessian(0.05, update_freq=2, seed=0)
  p_c, _, _ = _run_closure(tx, params, loss_fn, batches, jit=False)
  p_f, _, _ = _run_fused(tx, params, loss_fn, batches, jit=False)
  p_j, _, _ = _run_fused(tx, params, loss_fn, batches, jit=True)
  _assert_trees_close(p_f, p_c)
  _assert_trees_close(p_j, p_c)


# --------------------------------------------------------------------------- lax.cond


def _count_prim(jaxpr, name):
  """Occurrences of primitive ``name`` in ``jaxpr``, inside sub-jaxprs too."""
  n = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == name:
      n += 1
    for sub in jax_core.jaxprs_in_params(eqn.params):
      n += _count_prim(sub, name)
  return n


def test_fused_step_runs_the_hvp_only_in_the_refresh_branch(mlp_problem):
  """With ``update_freq > 1`` under ``jit`` the fused route is one ``lax.cond``
  whose non-refresh branch is exactly ``value_and_grad`` (same matmuls), and the
  Hessian-vector product lives only in the refresh branch."""
  params, loss_fn, batch = mlp_problem
  tx = ah.adahessian(0.05, update_freq=3)
  st = tx.init(params)
  vgh = ah.value_grad_and_hessian_diag(loss_fn)

  jaxpr = jax.make_jaxpr(lambda p, s, b: vgh(p, s, b))(params, st, batch).jaxpr
  conds = [e for e in jaxpr.eqns if e.primitive.name == "cond"]
  assert len(conds) == 1
  # Everything with a matmul is inside the cond: nothing runs on both kinds of step.
  outside = sum(e.primitive.name == "dot_general" for e in jaxpr.eqns)
  assert outside == 0
  skip_branch, refresh_branch = conds[0].params["branches"]  # index 0 = False
  vg = jax.make_jaxpr(lambda p: jax.value_and_grad(loss_fn)(p, batch))(params).jaxpr
  n_vg = _count_prim(vg, "dot_general")
  assert _count_prim(skip_branch.jaxpr, "dot_general") == n_vg
  # Forward-over-reverse: at least twice the matmuls of value_and_grad.
  assert _count_prim(refresh_branch.jaxpr, "dot_general") >= 2 * n_vg

  # And at run time the branches do what they say: zeros off the refresh steps.
  step = jax.jit(vgh)
  for t in range(4):
    _, _, h = step(params, st, batch)
    nonzero = any(bool(jnp.any(x != 0)) for x in jax.tree.leaves(h))
    assert nonzero == (t % 3 == 0)
    st = _bump_count(st)


def _bump_count(opt_state):
  """The same optimizer state with the AdaHessian step counter advanced by one."""
  inner = ah.find_adahessian_state(opt_state)
  bumped = inner._replace(count=inner.count + 1)
  is_state = lambda x: isinstance(x, ah.ScaleByAdaHessianState)
  return jax.tree.map(lambda x: bumped if is_state(x) else x, opt_state, is_leaf=is_state)


def test_fused_step_on_a_non_refresh_step_costs_one_value_and_grad(mlp_problem):
  """XLA's cost of the fused route with the counter fixed at a non-refresh step is
  that of ``value_and_grad`` (the HVP branch is gone), and at a refresh step more."""
  params, loss_fn, batch = mlp_problem
  tx = ah.adahessian(0.05, update_freq=3)
  vgh = ah.value_grad_and_hessian_diag(loss_fn)

  def flops(fn, *args):
    return jax.jit(fn).lower(*args).compile().cost_analysis()["flops"]

  def at_count(c):
    st = tx.init(params)
    inner = ah.find_adahessian_state(st)
    # The counter is a compile-time constant; everything else is an argument.
    return lambda p, b: vgh(p, _replace_inner(st, inner._replace(count=jnp.int32(c))), b)

  vg = flops(lambda p, b: jax.value_and_grad(loss_fn)(p, b), params, batch)
  skip = flops(at_count(1), params, batch)
  refresh = flops(at_count(0), params, batch)
  assert skip <= 1.05 * vg + 1e3
  assert refresh > 1.8 * vg


def test_fused_step_tests_a_half_precision_estimate_for_finiteness_once(mlp_problem):
  """The fused route marks a non-finite estimate in the gradient and the transform tests the same
  estimate: with bfloat16 params (float32 moments) XLA computes that test once, as in the closure
  route, not a second time on the estimate cast to float32 (a pass over it, one reduce a leaf)."""
  params, loss_fn, batch = mlp_problem
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  batch = jax.tree.map(lambda x: x.astype(jnp.bfloat16), batch)
  tx = ah.adahessian(0.05)
  st = tx.init(params)
  vgh = ah.value_grad_and_hessian_diag(loss_fn)

  def fused(p, s, b):
    _, g, h = vgh(p, s, b)
    return tx.update(g, s, p, hessian_diag=h)

  def closure(p, s, b):
    g = jax.grad(loss_fn)(p, b)
    return tx.update(g, s, p, value_fn=lambda q: loss_fn(q, b))

  def reduces(fn):
    text = jax.jit(fn).lower(params, st, batch).compile().as_text()
    return text.count(" reduce(")

  assert reduces(fused) == reduces(closure)


def _replace_inner(opt_state, new_inner):
  is_state = lambda x: isinstance(x, ah.ScaleByAdaHessianState)
  return jax.tree.map(lambda x: new_inner if is_state(x) else x, opt_state, is_leaf=is_state)


# --------------------------------------------------------------------------- compile once


@pytest.mark.parametrize(
  "route,update_freq,n_samples",
  [("fused", 1, 1), ("fused", 3, 1), ("closure", 3, 2), ("closure", 1, 1)],
)
def test_train_step_compiles_once(mlp_problem, route, update_freq, n_samples):
  params, loss_fn, batch = mlp_problem
  batches = _batches(batch, 6)
  tx = ah.adahessian(0.05, update_freq=update_freq, n_samples=n_samples)
  vgh = ah.value_grad_and_hessian_diag(loss_fn)
  traces = []

  def step(p, st, batch):
    traces.append(1)
    if route == "fused":
      _, g, h = vgh(p, st, batch)
      u, st = tx.update(g, st, p, hessian_diag=h)
    else:
      g = jax.grad(loss_fn)(p, batch)
      u, st = tx.update(g, st, p, value_fn=lambda q: loss_fn(q, batch))
    return optax.apply_updates(p, u), st

  step = jax.jit(step)
  st = tx.init(params)
  with CompileCounter() as first:
    params, st = step(params, st, batches[0])
    jax.block_until_ready(params)
  assert first.count >= 1  # the counter sees compilations at all
  with CompileCounter() as later:
    for b in batches[1:]:
      params, st = step(params, st, b)
    jax.block_until_ready(params)
  assert later.count == 0
  assert len(traces) == 1
  assert int(ah.find_adahessian_state(st).count) == len(batches)


# --------------------------------------------------------------------------- host-side refresh


def _run_two_programs(tx, params, loss_fn, batches, update_freq):
  """The refresh decided on the host: one compiled program per decision, no conditional."""
  traces = {True: 0, False: 0}

  def make_step(refresh):
    vgh = ah.value_grad_and_hessian_diag(loss_fn, refresh=refresh)

    @jax.jit
    def step(p, st, batch):
      traces[refresh] += 1
      loss, g, h = vgh(p, st, batch)
      u, st = tx.update(g, st, p, hessian_diag=h, refresh=refresh)
      return optax.apply_updates(p, u), st, loss

    return step

  steps = {True: make_step(True), False: make_step(False)}
  st = tx.init(params)
  for i, batch in enumerate(batches):
    params, st, _ = steps[i % update_freq == 0](params, st, batch)
  return params, st, traces


@pytest.mark.parametrize("lazy_moment", ["repeat", "refresh"])
def test_host_side_refresh_equals_the_in_graph_schedule_and_compiles_once_each(
  mlp_problem, lazy_moment
):
  params, loss_fn, batch = mlp_problem
  batches = _batches(batch, 8)
  tx = ah.adahessian(0.05, update_freq=3, lazy_moment=lazy_moment, curvature_floor=0.1)
  p_graph, st_graph, _ = _run_fused(tx, params, loss_fn, batches)
  p_host, st_host, traces = _run_two_programs(tx, params, loss_fn, batches, 3)
  _assert_trees_close(p_host, p_graph)
  _assert_trees_close(st_host, st_graph)
  assert traces == {True: 1, False: 1}
  for refresh in (True, False):  # neither program has a conditional
    vgh = ah.value_grad_and_hessian_diag(loss_fn, refresh=refresh)

    def update(p, st, b, vgh=vgh, refresh=refresh):
      _, g, h = vgh(p, st, b)
      return tx.update(g, st, p, hessian_diag=h, refresh=refresh)

    assert "cond" not in str(jax.make_jaxpr(update)(params, tx.init(params), batch))


def test_host_side_refresh_is_checked_against_the_schedule_outside_jit(mlp_problem):
  params, loss_fn, batch = mlp_problem
  tx = ah.adahessian(0.05, update_freq=3)
  st = tx.init(params)
  with pytest.raises(ValueError, match="refresh=False at step 0"):
    ah.value_grad_and_hessian_diag(loss_fn, refresh=False)(params, st, batch)
  with pytest.raises(ValueError, match="needs a lazy state"):
    ah.value_grad_and_hessian_diag(loss_fn, refresh=False)(
      params, ah.adahessian(0.05).init(params), batch
    )
  with pytest.raises(TypeError, match=r"Python \(or NumPy\) bool"):
    ah.value_grad_and_hessian_diag(loss_fn, refresh=jnp.asarray(True))(params, st, batch)
  # Passed through a jitted step it arrives traced; the message said only what it must be.
  step = jax.jit(lambda p, s, r: ah.value_grad_and_hessian_diag(loss_fn, refresh=r)(p, s, batch))
  with pytest.raises(TypeError, match=r"got JitTracer.*static_argnames='refresh'"):
    step(params, st, True)


def test_refresh_moment_state_is_adams_size(mlp_problem):
  params, _, _ = mlp_problem
  nbytes = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))
  adam = nbytes(optax.adam(0.1).init(params))  # count + mu + nu
  param_bytes = nbytes(params)
  small = nbytes(ah.adahessian(0.1, update_freq=4, lazy_moment="refresh").init(params))
  assert small - adam == 8 + 4  # the probe key and the refresh interval, nothing parameter-sized
  assert nbytes(ah.adahessian(0.1, update_freq=4).init(params)) - small == param_bytes


# --------------------------------------------------------------------------- benchmark smoke


def test_benchmark_quick_mode_runs(tmp_path):
  cmd = [
    sys.executable,
    str(ROOT / "benchmarks" / "step_time.py"),
    "--quick",
    "--models",
    "mlp",
    "--groups",
    "main",
    "--out",
    str(tmp_path),
  ]
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  out = json.loads((tmp_path / "step_time_quick.json").read_text())
  rows = out["results"]["mlp"]["groups"]["main"]
  kinds = {r["kind"] for r in rows}
  assert {"sgd", "adam", "closure", "fused", "sophia"} <= kinds
  for r in rows:
    assert r["ms_per_step_median"] > 0 and r["flops"] > 0 and r["peak_bytes"] > 0
    assert np.isfinite(r["final_loss"])


def test_hand_written_data_parallel_fused_step_checks_tx_through_expected_args():
  """The hand-written fused step of docs/distributed.md (``per_device_probe_state`` for
  independent probes, ``pmean`` of the gradients) passes ``expected_axis_name`` and
  ``expected_independent_probes`` to ``tx.update``: a ``tx`` built without the axis (which would
  not average the estimate: the replicas drift) or without independent probes then raises, and
  for the right ``tx`` the compiled step is the one without them (``vmap`` with an axis name
  stands in for ``pmap``)."""
  from adahessian_jax import distributed

  params = {"w": jnp.ones(3)}
  batches = jnp.array([[1.0, 2.0, 3.0], [-2.0, 0.5, 4.0]])  # one row per replica
  loss_fn = lambda p, b: jnp.tanh(jnp.dot(b, p["w"])) ** 2
  vgh = ah.value_grad_and_hessian_diag(loss_fn)

  def run(tx, **expected):
    opt_state = tx.init(params)

    def step(batch):
      probe_state = distributed.per_device_probe_state(opt_state, "batch")
      _, grads, hdiag = vgh(params, probe_state, batch)
      grads = jax.lax.pmean(grads, "batch")
      updates, _ = tx.update(grads, opt_state, params, hessian_diag=hdiag, **expected)
      return updates["w"]

    return jax.jit(jax.vmap(step, axis_name="batch")).lower(batches)

  expected = {"expected_axis_name": "batch", "expected_independent_probes": True}
  with pytest.raises(ValueError, match=r"averaged the gradients over 'batch'.*axis_name=None"):
    run(ah.adahessian(0.1), **expected)
  with pytest.raises(ValueError, match=r"independent_probes=True\).*built with independent"):
    run(ah.adahessian(0.1, axis_name="batch"), **expected)
  tx = ah.adahessian(0.1, axis_name="batch", independent_probes=True)
  assert run(tx, **expected).as_text() == run(tx).as_text()
  updates = run(tx, **expected).compile()(batches)
  np.testing.assert_array_equal(updates[0], updates[1])  # the replicas step alike


def test_a_has_aux_that_is_no_bool_is_refused():
  """A str from a config is truthy: has_aux="False" was read as True, and the error at the first
  call said the loss "was given has_aux=True"."""
  with pytest.raises(ValueError, match=r"diag: has_aux must be True or False, got 'False'\."):
    ah.value_grad_and_hessian_diag(lambda p: jnp.sum(p), has_aux="False")
