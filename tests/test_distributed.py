"""Data-parallel and multi-host AdaHessian (``adahessian_jax.distributed``).

The device count must be set before JAX starts, so every check runs in a
subprocess with ``XLA_FLAGS=--xla_force_host_platform_device_count=N``:
``_distributed_worker.py`` (one process, 4 devices: ``pmap``, ``jit`` with
shardings, ``shard_map``; NNX, BatchNorm, tensor parallelism, Explicit mesh axes, each a
section with its own results) and ``_multihost_worker.py`` (2 processes x 2
devices joined by ``jax.distributed`` on loopback; its processes also save the orbax
checkpoint, a section before). Each is run once per module and the tests below read its
results; ``_multihost_checkpoint_worker.py`` (2 fresh processes resuming that checkpoint) is run
by its test.
``_distributed_common.py`` holds the shared problem: a tanh MLP trained for 50 steps
on a 32-example batch.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
from conftest import with_fast_compile

HERE = os.path.dirname(os.path.abspath(__file__))
TIMEOUT_S = 420

F32_TOL, F64_TOL = 1e-6, 1e-12
TOL = {"float32_k1": F32_TOL, "float64_k1": F64_TOL, "float32_k2": F32_TOL}


def _env(n_devices):
  env = dict(os.environ)
  env["XLA_FLAGS"] = with_fast_compile(f"--xla_force_host_platform_device_count={n_devices}")
  env["JAX_PLATFORMS"] = "cpu"
  env.pop("JAX_ENABLE_X64", None)
  return env


def _kill(proc):
  if proc.poll() is None:
    try:
      os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
      pass
  proc.wait()


def _run_all(commands, n_devices, timeout, log_dir):
  """Runs ``commands`` concurrently, each in its own process group; kills all on failure.

  Raises ``AssertionError`` with every process's exit status (``None``: still running when it was
  stopped, because another one failed or the time limit passed) and the end of its output.
  """
  procs, logs, ended, timed_out = [], [], [], False
  try:
    for i, cmd in enumerate(commands):
      log = open(os.path.join(log_dir, f"log_{i}.txt"), "w+")
      logs.append(log)
      procs.append(
        subprocess.Popen(
          [sys.executable, *cmd],
          cwd=HERE,
          env=_env(n_devices),
          stdout=log,
          stderr=subprocess.STDOUT,
          start_new_session=True,
        )
      )
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in procs):
      timed_out = time.monotonic() > deadline
      if timed_out or any(p.poll() not in (None, 0) for p in procs):
        break
      time.sleep(0.2)
    ended = [p.poll() for p in procs]
  finally:
    for p in procs:
      _kill(p)
  outputs = []
  for log in logs:
    log.seek(0)
    outputs.append(log.read()[-4000:])
    log.close()
  if ended != [0] * len(procs):
    why = f"timed out after {timeout} s" if timed_out else "failed"
    report = "".join(
      f"\n--- {' '.join(cmd)}: exit status {rc}\n{out}"
      for cmd, rc, out in zip(commands, ended, outputs, strict=True)
    )
    raise AssertionError(f"the workers {why}:{report}")


def _free_port():
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def four_devices(tmp_path_factory):
  """The folder of ``_distributed_worker.py``'s sections (one process, 4 devices; the work of
  seven processes, so twice the time limit)."""
  out = tmp_path_factory.mktemp("four_devices")
  _run_all([["_distributed_worker.py", str(out)]], 4, 2 * TIMEOUT_S, str(out))
  return out


def _section(four_devices, name):
  """The folder of the worker's section ``name``; the test fails with its traceback if it
  raised."""
  error = four_devices / f"{name}.error"
  if error.exists():
    pytest.fail(f"section {name} of _distributed_worker.py raised:\n{error.read_text()}")
  return four_devices / name


def _section_json(four_devices, name):
  with open(_section(four_devices, name) / "results.json") as f:
    return json.load(f)


def _section_stdout(four_devices, name):
  return (_section(four_devices, name) / "stdout.txt").read_text()


@pytest.fixture(scope="module")
def single_host(four_devices):
  out = _section(four_devices, "single_host")
  return _section_json(four_devices, "single_host"), dict(np.load(out / "reference.npz"))


def _has_orbax():
  """Whether orbax-checkpoint is installed (without importing it here: only the workers use it)."""
  try:
    return importlib.util.find_spec("orbax.checkpoint") is not None
  except ModuleNotFoundError:
    return False


@pytest.fixture(scope="module")
def multi_host_run(tmp_path_factory):
  """The folder of ``_multihost_worker.py``'s two processes, and why they failed (``None`` if
  they did not): the ``multi_host`` section's results and, where orbax is installed, the
  ``checkpoint`` section's straight run and checkpoint (in ``ckpt/``)."""
  out = tmp_path_factory.mktemp("multi_host")
  port = str(_free_port())
  cmds = [["_multihost_worker.py", str(i), "2", port, str(out)] for i in range(2)]
  if _has_orbax():
    (out / "ckpt").mkdir()
    cmds = [[*cmd, str(out / "ckpt")] for cmd in cmds]
  try:  # the two sections' time limits
    _run_all(cmds, 2, 2 * TIMEOUT_S, str(out))
  except AssertionError as e:
    return out, str(e)
  return out, None


def _multi_host_section(multi_host_run, name, files):
  """``OUT_DIR/<file>`` for each of ``files`` (one per process) written by the section ``name``
  of ``_multihost_worker.py``; the test fails with the section's traceback if it raised, with the
  processes' failure if they stopped before it finished."""
  out, failure = multi_host_run
  for i in range(2):
    error = out / f"{name}_{i}.error"
    if error.exists():
      pytest.fail(f"section {name} of _multihost_worker.py raised on process {i}:\n"
                  f"{error.read_text()}")  # fmt: skip
  paths = [out / f for f in files]
  missing = [p.name for p in paths if not p.exists()]
  if missing:
    pytest.fail(f"section {name} of _multihost_worker.py did not write {missing}:\n{failure}")
  return paths


@pytest.fixture(scope="module")
def multi_host(multi_host_run):
  files = [f"process_{i}.{ext}" for i in range(2) for ext in ("json", "npz")]
  json0, npz0, json1, npz1 = _multi_host_section(multi_host_run, "multi_host", files)
  return [(json.load(open(j)), dict(np.load(n))) for j, n in ((json0, npz0), (json1, npz1))]


def _config_modes(results):
  for config, modes in results.items():
    if config in TOL:
      for mode, r in modes.items():
        yield config, mode, r


def test_replicas_identical_after_50_steps(single_host):
  results, _ = single_host
  assert results["steps"] == 50 and results["n_devices"] == 4
  checked = 0
  for config, mode, r in _config_modes(results):
    if mode != "pmap_no_hessian_pmean":
      assert r["replica_diff"] == 0.0, (config, mode, r)
      checked += 1
  assert checked >= 15


def test_pmapped_steps_compile_once_on_replicated_params_and_state(single_host):
  """Every pmap mode (value_fn and fused routes, Linen's TrainState.apply_loss, lazy refresh)
  copies params and state with distributed.replicate: no compile after the first step."""
  results, _ = single_host
  compiles = {
    (c, m): r["compiles_after_first"] for c, m, r in _config_modes(results) if "pmap" in m
  }
  assert len(compiles) == 8 and set(compiles.values()) == {0}, compiles


def test_without_hessian_averaging_replicas_drift(single_host):
  """The negative control (optax Sophia's behaviour): the check above can fail."""
  results, _ = single_host
  assert results["float32_k1"]["pmap_no_hessian_pmean"]["replica_diff"] > 1e-3


@pytest.mark.parametrize("mode", ["pmap", "jit_dp", "jit_fsdp", "shard_map"])
@pytest.mark.parametrize("config", ["float32_k1", "float64_k1"])
def test_exact_policy_equals_single_device(single_host, config, mode):
  results, _ = single_host
  assert results[config][mode]["vs_ref"] <= TOL[config], results[config][mode]


def test_exact_policy_other_routes_and_lazy_refresh(single_host):
  results, _ = single_host
  assert results["float32_k1"]["shard_map_fused"]["vs_ref"] <= F32_TOL
  for mode in ("pmap", "jit_fsdp"):  # update_freq=2: lax.cond refresh and key handling
    assert results["float32_k2"][mode]["vs_ref"] <= F32_TOL, mode


def test_independent_probes_differ_but_agree_across_routes(single_host):
  results, _ = single_host
  r = results["float32_k1"]
  # A different estimator: the trajectory leaves the single-device one...
  assert r["pmap_independent"]["vs_ref"] > 1e-3
  assert results["float32_k2"]["shard_map_independent"]["vs_ref"] > 1e-3
  # ...but it is one well-defined estimator: pmap, shard_map, value_fn and fused agree.
  assert r["shard_map_independent"]["vs_pmap_independent"] <= F32_TOL
  assert r["pmap_fused_independent"]["vs_pmap_independent"] <= F32_TOL


def test_train_state_apply_loss_with_axis_name_steps_like_the_data_parallel_recipe(single_host):
  """``linen.TrainState.apply_loss(..., axis_name=)`` under ``pmap`` and ``shard_map``: the same
  probes give the single-device run on the global batch, independent probes the value_fn route's
  independent estimator (also with update_freq=2); the replicas stay identical (checked above)."""
  results, _ = single_host
  assert results["float32_k1"]["pmap_train_state"]["vs_ref"] <= F32_TOL
  assert results["float64_k1"]["shard_map_train_state"]["vs_ref"] <= F64_TOL
  independent = results["float32_k1"]["shard_map_train_state_independent"]
  assert independent["vs_ref"] > 1e-3 and independent["vs_pmap_independent"] <= F32_TOL
  lazy = results["float32_k2"]["pmap_train_state_independent"]
  assert lazy["vs_ref"] > 1e-3 and lazy["vs_shard_map_independent"] <= F32_TOL


def test_nnx_value_grad_and_hessian_diag_with_axis_name_steps_like_one_device(four_devices):
  """``adahessian_jax.nnx.value_grad_and_hessian_diag(..., axis_name=)`` under ``jax.pmap``
  (``nnx.merge`` inside) and ``nnx.shard_map``, float64: the same probes give the single-device
  run on the global batch, also where the loss writes a parameter (``nnx.WeightNorm``); the
  replicas stay identical."""
  results = _section_json(four_devices, "nnx_same")
  assert results["steps"] >= 3
  # replicate(nnx.as_pure(state)), as the step returns it: one compile (np.broadcast_to: two).
  assert results["pmap_compiles_after_first"] == 0
  for mode in ("pmap", "shard_map", "shard_map_weight_norm"):
    r = results[mode]
    assert r["vs_ref"] <= F64_TOL and r["replica_diff"] == 0.0, (mode, r)


def test_nnx_independent_probes_equal_the_value_fn_routes_independent_estimator(four_devices):
  """With ``independent_probes=True`` the fused NNX route under ``nnx.shard_map`` steps like the
  ``value_fn`` route (under ``jax.pmap``) with a ``tx`` built with ``independent_probes=True``;
  that estimator is another than the same-probe one (which equals one device's, above), and the
  replicas (the probe key in the optimizer's state included) stay identical."""
  results = _section_json(four_devices, "nnx_independent")
  assert results["pmap_value_fn"]["replica_diff"] == 0.0
  assert results["pmap_value_fn"]["vs_ref"] > 1e-3
  r = results["shard_map"]
  assert r["vs_value_fn"] <= F64_TOL and r["replica_diff"] == 0.0, r
  assert r["vs_ref"] > 1e-3, r


def test_synchronised_batchnorm_apply_loss_steps_like_one_device(four_devices):
  """A Linen model with ``nn.BatchNorm(axis_name="batch")`` trained by
  ``TrainState.apply_loss(..., axis_name="batch")`` under ``pmap`` and ``shard_map`` (4 devices,
  float64, 3 steps): params and ``batch_stats`` equal one device's on the global batch. With
  ``independent_probes=True`` each device's loss reads every device's probe through the
  synchronised statistics, which biases the estimate: ``apply_loss`` and ``tx.update(value_fn=)``
  warn, and do not for a BatchNorm that is not synchronised."""
  results = _section_json(four_devices, "sync_bn")
  assert results["pmap"]["vs_ref"] <= F64_TOL and results["pmap"]["replica_diff"] == 0.0
  assert results["shard_map"]["vs_ref"] <= F64_TOL
  caught = results["warnings"]
  for route, caller in (
    ("apply_loss", "TrainState.apply_loss"),
    ("value_fn", "scale_by_adahessian"),
  ):
    assert len(caught[f"{route}_sync"]) == 1, caught
    message = caught[f"{route}_sync"][0]
    assert message.startswith(caller) and "axis_name='batch'" in message, message
    assert "independent_probes=False" in message, message
    assert caught[f"{route}_local"] == [], caught


def test_jit_state_keeps_param_shardings(single_host):
  results, _ = single_host
  for config in ("float32_k1", "float64_k1"):
    for mode, shard_shape in (("jit_dp", [8, 16]), ("jit_fsdp", [8, 4])):
      info = results[config][mode]["sharding"]
      assert info.pop("mu_w1_shard_shape") == shard_shape, (config, mode)
      assert all(info.values()), (config, mode, info)


def test_default_hparams_float32_within_rounding_noise(single_host):
  """With eps=1e-4 and k=1 the first step divides by |D| + eps, amplifying rounding.

  The distributed run is then as close to the reference as the reference is to
  itself with the batch rows reversed (the same loss summed in another order).
  """
  results, _ = single_host
  r = results["default_hparams_float32"]
  assert r["jit_dp_vs_ref"] <= 10 * max(r["permuted_batch_vs_ref"], 1e-7), r


def test_two_processes_identical_and_equal_single_device(single_host, multi_host):
  """jit (data parallel, FSDP), shard_map and pmap over 2 processes x 2 devices: the processes'
  params are bit-identical and equal one device's; pmap's params and state, copied by
  distributed.replicate on each process, compile the step once (it was not run across
  processes before) and stay bit-identical across the replicas."""
  _, reference = single_host
  (info0, params0), (info1, params1) = multi_host
  assert {info0["process_index"], info1["process_index"]} == {0, 1}
  for info in (info0, info1):
    assert info["device_count"] == 4 and info["local_device_count"] == 2
    assert all(v == 0.0 for k, v in info.items() if k.endswith("replica_diff"))
    assert info["drift_across_processes"] == 1.0  # process 1's copy vs process 0's
    compiles = {k: v for k, v in info.items() if k.endswith("compiles_after_first")}
    assert compiles == {
      "float32_k1/pmap/compiles_after_first": 0,
      "float64_k1/pmap/compiles_after_first": 0,
    }
    message = info["replicate_on_other_devices"]
    assert f"belongs to this process (process {info['process_index']}" in message, message
  assert sorted(params0) == sorted(params1) and len(params0) == 4 * 7
  for name, value in params0.items():
    assert np.array_equal(value, params1[name]), name
    config, _, leaf = name.split("/")
    diff = np.max(np.abs(value.astype(np.float64) - reference[f"{config}/{leaf}"]))
    assert diff <= TOL[config], (name, diff)


def test_max_replica_difference_of_pmap_copies_compares_other_processes_copies(multi_host):
  """pmap copies that each process made from its own values (params initialised from a
  per-process seed): every process holds only its own copies, which agree, so only a comparison
  with the other process's shows the difference of 1.0; on copies fetched to the host (NumPy),
  which need not be taken on every process, this process's only."""
  for info, _ in multi_host:
    assert info["drift_across_processes_stacked"] == 1.0
    assert info["drift_across_processes_stacked_host"] == 0.0


@pytest.fixture(scope="module")
def tensor_parallel(four_devices):
  return _section_json(four_devices, "tensor_parallel")


@pytest.mark.parametrize("route", ["fused", "value_fn"])
def test_tensor_parallel_probes_independent_across_shards(tensor_parallel, route):
  """Kernels split over a ``model`` axis under ``shard_map``: each shard draws its own probe.

  A probe drawn from the replicated key alone repeats on every shard (JAX refused the tangent,
  which did not vary like the kernel; with ``check_vma=False`` the estimate was biased by the
  Hessian entries between the repeats: errors of 0.19-0.48 against a noise of 0.006-0.009 with
  20000 probes). Unbiased: within 6 standard deviations of the exact diagonal everywhere.
  """
  assert tensor_parallel[f"{route}_z"] <= 6.0, tensor_parallel


def test_tensor_parallel_independent_probes_repeat_no_block_across_devices_and_steps(
  tensor_parallel,
):
  """Independent probes with a kernel split over ``model``: no probe block is drawn twice.

  Device 0 folded its index 0 into the key, and ``fold_in(key, 0)`` is ``split(key)[0]``, the
  state's next key: the block device (data 0, model 0) drew for the split leaf at step t was the
  probe of the replicated leaf of that shape on data device 1 at step t+1 (2 repeats in 3 steps).
  """
  assert tensor_parallel["repeated_blocks"] == 0, tensor_parallel


def test_tensor_parallel_given_diagonal_equals_single_device(tensor_parallel):
  """The exact diagonal given to the split step: the updates are one device's, to rounding.

  Each shard decided alone whether the estimate was finite, so the replicated bias's update
  depended on the shard (``shard_map`` refused it as replicated output; with ``check_vma=False``
  a NaN in one shard's block zeroed the bias's update there only, 0.029 elsewhere).
  """
  r = tensor_parallel
  assert r["diag_vs_single"] <= 1e-12 and r["diag_max_update"] > 0.01, r
  assert r["nan_vs_single"] == 0.0 and r["nan_max_update"] == 0.0, r
  # Its default rules, read off the shards, are flagged; those read on the whole model are not.
  assert (
    len(r["default_rules_warning"]) == 1 and "inside shard_map" in r["default_rules_warning"][0]
  )
  assert r["whole_model_rules_warnings"] == 0, r


def test_axis_name_naming_an_axis_the_params_are_split_over_is_refused():
  """The estimate is ``pmean``-ed over ``axis_name``: over an axis a parameter is split over it
  would average different blocks (silently, or a cond type error with ``update_freq > 1``)."""
  import jax
  import jax.numpy as jnp
  import optax
  from jax.sharding import PartitionSpec as P

  import adahessian_jax as ah
  from adahessian_jax import distributed

  auto = (jax.sharding.AxisType.Auto,) * 2
  mesh = jax.make_mesh((1, 1), ("data", "model"), axis_types=auto, devices=jax.devices()[:1])
  params = {"b": jnp.zeros(2), "w": jnp.ones((4, 2))}
  specs = {"b": P(), "w": P(None, "model")}  # w split over model (FSDP/tensor parallel)
  for axis_name in (("data", "model"), "model"):
    tx = ah.adahessian(0.1, axis_name=axis_name)
    state = tx.init(params)
    state_specs = jax.tree.map(lambda _: P(), state)
    state_specs = (state_specs[0]._replace(mu=specs, nu=specs), *state_specs[1:])

    def step(p, s, x, tx=tx, axis_name=axis_name):
      loss = lambda q: jnp.sum(jnp.tanh(x @ q["w"] + q["b"]) ** 2)
      grads = jax.lax.pmean(jax.grad(loss)(distributed.device_varying(p, axis_name)), axis_name)
      updates, s = tx.update(grads, s, p, value_fn=loss)
      return optax.apply_updates(p, updates), s

    mapped = jax.shard_map(
      step,
      mesh=mesh,
      in_specs=(specs, state_specs, P(("data", "model"))),
      out_specs=(specs, state_specs),
    )
    with pytest.raises(
      ValueError, match=r"\['w'\] is split over mesh axis 'model', which axis_name"
    ) as e:
      jax.jit(mapped)(params, state, jnp.ones((2, 4)))
    # The way out for params copied per device for pmap, the common way to arrive here.
    assert "copies made for jax.pmap" in str(e.value) and "in_specs=P()" in str(e.value)


def test_split_parameters_under_shard_map_warn_unless_the_rules_are_the_whole_models():
  """Inside shard_map the transform sees a split parameter's shard, and the default rule reads
  layouts off shapes (an nn.scan's layer axis split: averaged as a convolution across the layers,
  updates off by 11 where one device's were at most 0.92). It warns, naming the fix; rules read
  on the whole model do not warn."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import PartitionSpec as P

  import adahessian_jax as ah
  from adahessian_jax import distributed, spatial

  auto = (jax.sharding.AxisType.Auto,) * 2
  mesh = jax.make_mesh((1, 1), ("data", "model"), axis_types=auto, devices=jax.devices()[:1])
  params = {"b": jnp.zeros(2), "w": jnp.ones((4, 2))}
  specs = {"b": P(), "w": P(None, "model")}
  diag = jax.tree.map(jnp.ones_like, params)
  for averaging, expected in ((None, 1), (spatial.resolve_rules(None, params), 0)):
    tx = ah.adahessian(0.1, axis_name="data", averaging=averaging)
    state = tx.init(params)
    state_specs = jax.tree.map(lambda _: P(), state)
    state_specs = (state_specs[0]._replace(mu=specs, nu=specs), *state_specs[1:])

    def step(g, s, p, tx=tx):  # a data-parallel estimate varies over the data axis
      return tx.update(g, s, p, hessian_diag=distributed.device_varying(diag, "data"))[0]

    mapped = jax.shard_map(step, mesh=mesh, in_specs=(specs, state_specs, specs), out_specs=specs)
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      jax.jit(mapped).lower(params, state, params)
    messages = [str(w.message) for w in caught if w.category is spatial.LayoutGuessWarning]
    assert len(messages) == expected, messages
    if expected:
      assert "(['w']) are split over mesh axes ['model']" in messages[0], messages
      assert "averaging=adahessian_jax.spatial.resolve_rules(None, params" in messages[0]


def test_update_under_shard_map_calls_an_averaging_callable_once_per_leaf():
  """To warn of shards read off their shapes, update read which leaves the default reads off
  shapes by calling the averaging callable again for every leaf (twice per leaf per trace); it
  reuses the rules the callable gave now, and still warns."""
  import collections

  import jax
  import jax.numpy as jnp
  from jax.sharding import PartitionSpec as P

  import adahessian_jax as ah
  from adahessian_jax import distributed, spatial

  auto = (jax.sharding.AxisType.Auto,) * 2
  mesh = jax.make_mesh((1, 1), ("data", "model"), axis_types=auto, devices=jax.devices()[:1])
  params = {"b": jnp.zeros(2), "w": jnp.ones((4, 2))}
  specs = {"b": P(), "w": P(None, "model")}
  calls = collections.Counter()

  def averaging(path, leaf):
    calls[jax.tree_util.keystr(path)] += 1
    return spatial.none() if leaf.ndim == 1 else None

  tx = ah.adahessian(0.1, axis_name="data", averaging=averaging)
  state = tx.init(params)
  state_specs = jax.tree.map(lambda _: P(), state)
  state_specs = (state_specs[0]._replace(mu=specs, nu=specs), *state_specs[1:])
  ones = lambda p: distributed.device_varying(jax.tree.map(jnp.ones_like, p), "data")
  step = lambda g, s, p: tx.update(g, s, p, hessian_diag=ones(p))[0]
  mapped = jax.shard_map(step, mesh=mesh, in_specs=(specs, state_specs, specs), out_specs=specs)
  calls.clear()
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    jax.jit(mapped).lower(params, state, params)
  assert calls == {"['b']": 1, "['w']": 1}
  messages = [str(w.message) for w in caught if w.category is spatial.LayoutGuessWarning]
  assert len(messages) == 1 and "(['w']) are split over mesh axes ['model']" in messages[0]


def test_update_under_shard_map_reads_the_tree_once(monkeypatch):
  """The check for leaves read off their shards' shapes read the leaves' paths and axis names
  again (_resolve._unread), after the rules had just read them at the same trace: it now takes
  the leaves that reading found read off shapes, and still warns of them."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import PartitionSpec as P

  import adahessian_jax as ah
  from adahessian_jax import _resolve, distributed, spatial

  auto = (jax.sharding.AxisType.Auto,) * 2
  mesh = jax.make_mesh((1, 1), ("data", "model"), axis_types=auto, devices=jax.devices()[:1])
  params = {"b": jnp.zeros(2), "w": jnp.ones((4, 2)), "v": jnp.ones((3, 2))}
  specs = {"b": P(), "w": P(None, "model"), "v": P()}
  tx = ah.adahessian(0.1, axis_name="data")
  state = tx.init(params)
  state_specs = jax.tree.map(lambda _: P(), state)
  state_specs = (state_specs[0]._replace(mu=specs, nu=specs), *state_specs[1:])
  ones = lambda p: distributed.device_varying(jax.tree.map(jnp.ones_like, p), "data")
  step = lambda g, s, p: tx.update(g, s, p, hessian_diag=ones(p))[0]
  mapped = jax.shard_map(step, mesh=mesh, in_specs=(specs, state_specs, specs), out_specs=specs)
  reads = []
  unread = _resolve._unread
  monkeypatch.setattr(_resolve, "_unread", lambda *a, **k: reads.append(1) or unread(*a, **k))
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    jax.jit(mapped).lower(params, state, params)
  assert len(reads) == 1
  messages = [str(w.message) for w in caught if w.category is spatial.LayoutGuessWarning]
  assert len(messages) == 1, messages
  assert "1 parameter(s) (['w']) are split over mesh axes ['model']" in messages[0]
  assert "reads the layout of 3 leaf(s) (['b'], ['v'], ['w'])" in messages[0]


def test_max_replica_difference_refuses_leaves_it_cannot_compare():
  """NumPy or Python leaves without ``stacked=True`` (e.g. ``jax.device_get`` of pmap outputs)
  returned 0.0, "bit-identical", whatever they held; a scalar with ``stacked=True`` raised an
  IndexError."""
  import jax.numpy as jnp

  from adahessian_jax import distributed

  drifted = np.array([[1.0, 2.0], [1.0, 3.5]])
  assert distributed.max_replica_difference({"a": drifted}, stacked=True) == 1.5
  with pytest.raises(TypeError, match=r"leaf at \['a'\] is a ndarray.*stacked=True"):
    distributed.max_replica_difference({"a": drifted})
  with pytest.raises(ValueError, match=r"leaf at \['b'\] is a scalar"):
    distributed.max_replica_difference({"a": drifted, "b": jnp.float32(1.0)}, stacked=True)
  assert distributed.max_replica_difference({"a": jnp.asarray(drifted)}) == 0.0  # one copy


def test_max_replica_difference_stacked_names_a_leaf_that_is_no_array():
  """With stacked=True a str leaf (a config's activation name) was said to be "a scalar", and a
  NumPy array of strs failed in NumPy with "could not convert string to float"."""
  import jax
  import jax.numpy as jnp

  from adahessian_jax import distributed

  stacked = np.array([[1.0, 2.0], [1.0, 2.0]])
  for leaf, shown in [
    ("relu", "str 'relu'"),
    (np.array(["a", "b"]), r"ndarray array\(\['a', 'b'\], dtype='<U1'\)"),
    (jax.ShapeDtypeStruct((2, 3), jnp.float32), "ShapeDtypeStruct ShapeDtypeStruct"),
  ]:
    with pytest.raises(TypeError, match=rf"the leaf at \['act'\] is {shown}.*, not an array of"):
      distributed.max_replica_difference({"w": stacked, "act": leaf}, stacked=True)
  assert distributed.max_replica_difference({"w": stacked}, stacked=True) == 0.0


def test_device_varying_and_max_replica_difference_name_a_bad_leaf_by_its_path():
  """A str leaf failed inside JAX ("Argument 'relu' of type <class 'str'> is not a valid JAX
  type"), naming no leaf; a tree that is one array was named 'the leaf at ' (keystr's '')."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import PartitionSpec as P

  from adahessian_jax import distributed

  tree = {"x": jnp.ones(3), "act": {"name": "relu"}}
  match = r"device_varying: the leaf at \['act'\]\['name'\] is str 'relu', not an array"
  with pytest.raises(TypeError, match=match):
    jax.vmap(lambda x: distributed.device_varying({**tree, "x": x}, "i")["x"], axis_name="i")(
      jnp.ones((2, 3))
    )
  mesh = jax.make_mesh((1,), ("i",))
  step = jax.shard_map(
    lambda x: distributed.device_varying({**tree, "x": x}, "i")["x"],
    mesh=mesh,
    in_specs=P(),
    out_specs=P("i"),
  )
  with pytest.raises(TypeError, match=match):
    step(jnp.ones(3))
  with pytest.raises(TypeError, match=r"the leaf at the root \(the tree is a single array\) is"):
    distributed.max_replica_difference(np.ones(3))


def test_max_replica_difference_refuses_a_stacked_that_is_no_bool():
  """A str from a config is truthy: stacked="False" compared the entries of one copy, [1, 2, 3.5],
  with its first and reported drift of 2.5 where there was none."""
  import jax.numpy as jnp

  from adahessian_jax import distributed

  one_copy = {"a": jnp.array([1.0, 2.0, 3.5])}
  assert distributed.max_replica_difference(one_copy, stacked=False) == 0.0
  for bad in ("False", "no", 1, None):
    with pytest.raises(ValueError, match=rf"stacked must be True or False, got {bad!r}\."):
      distributed.max_replica_difference(one_copy, stacked=bad)
  assert distributed.max_replica_difference(one_copy, stacked=np.bool_(True)) == 2.5


def test_max_replica_difference_of_complex_infinite_and_large_integer_values():
  """Cast to float64, a complex leaf lost its imaginary part (drift there gave 0.0,
  "bit-identical"), equal infinities gave NaN (``inf - inf``), and int64 values past 2**53 that
  differ compared equal."""
  from adahessian_jax import distributed

  mrd = lambda x: distributed.max_replica_difference({"a": x}, stacked=True)
  assert mrd(np.array([[1 + 1j], [1 + 3j]])) == 2.0
  assert mrd(np.array([[np.inf, -np.inf, 1.0], [np.inf, -np.inf, 1.0]])) == 0.0
  assert mrd(np.array([[np.inf, 1.0], [np.inf, 1.5]])) == 0.5
  assert mrd(np.array([[np.inf], [-np.inf]])) == np.inf
  assert np.isnan(mrd(np.array([[np.nan], [np.nan]])))
  assert mrd(np.array([[2**53], [2**53 + 1]], np.int64)) == 1.0
  assert mrd(np.array([[-128, 3], [127, 3]], np.int8)) == 255.0
  assert mrd(np.array([[True], [True]])) == 0.0
  import jax.numpy as jnp

  assert mrd(np.array([[1.0], [1.25]], jnp.bfloat16)) == 0.25


def test_per_device_probe_state_errors_name_the_problem():
  """Outside a map JAX's NameError came from ``axis_index``; a state without AdaHessian came
  back unchanged, so the "independent" probes were not."""
  import optax

  import adahessian_jax as ah
  from adahessian_jax import distributed

  params = {"w": np.ones((2, 2), np.float32)}
  with pytest.raises(ValueError, match=r"axis_name='data' is not an axis"):
    distributed.per_device_probe_state(ah.adahessian(0.1).init(params), "data")
  with pytest.raises(ValueError, match="no AdaHessian state"):
    distributed.per_device_probe_state(optax.adam(0.1).init(params), "data")


def test_device_varying_and_per_device_probe_state_refuse_axis_name_none():
  """They said "axis_name=None is not an axis of the enclosing pmap or shard_map ... Pass the axis
  name the step is mapped over, or axis_name=None under jax.jit", the value given."""
  import jax
  import jax.numpy as jnp

  import adahessian_jax as ah
  from adahessian_jax import distributed

  state = ah.adahessian(0.1).init({"w": jnp.ones(2)})
  match = r"axis_name=None names no mapped axis: pass the axis name the step is mapped over"
  for call in (
    lambda x: distributed.device_varying(x, None),
    lambda x: distributed.per_device_probe_state(state, None),
  ):
    with pytest.raises(ValueError, match=match) as caught:
      jax.vmap(call, axis_name="batch")(jnp.ones((2, 3)))
    assert "axis_name=None under jax.jit" not in str(caught.value)


def test_value_fn_reduced_over_axis_name_is_refused_under_shard_map():
  """Under shard_map the derivatives of a pmean-ed loss at this device's parameters are 1/P of
  its share: with such a value_fn the averaged estimate was silently P times too small (4
  devices: D 1/4 of one device's on the global batch, where pmap's was one device's)."""
  import jax
  import jax.numpy as jnp
  import optax
  from jax.sharding import PartitionSpec as P

  import adahessian_jax as ah

  mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  tx = ah.adahessian(0.1, axis_name="data")
  params = {"w": jnp.ones((3, 2))}
  x = jnp.arange(12.0).reshape(4, 3) / 10

  def run(reduce):
    def step(params, state, x):
      loss = lambda p: reduce(jnp.mean((x @ p["w"]) ** 2))
      grads = jax.tree.map(jnp.zeros_like, params)
      updates, state = tx.update(grads, state, params, value_fn=loss)
      return optax.apply_updates(params, updates)

    specs = (P(), P(), P("data"))
    return jax.jit(jax.shard_map(step, mesh=mesh, in_specs=specs, out_specs=P()))(
      params, tx.init(params), x
    )

  run(lambda loss: loss)  # this device's loss
  match = r"value_fn returns the same loss on every device of mesh axis 'data' \(it is reduced"
  for reduce in (lambda loss: jax.lax.pmean(loss, "data"), lambda loss: jax.lax.psum(loss, "data")):
    with pytest.raises(ValueError, match=match):
      run(reduce)


def test_fused_routes_refuse_a_loss_reduced_over_the_data_axis_under_shard_map():
  """The fused route differentiates at parameters and state made device-varying over the data
  axis, where a pmean-ed loss's derivatives are 1/P of this device's share: its gradient and
  estimate were silently P times too small (8 devices: both 1/8 of one device's on the global
  batch), through value_grad_and_hessian_diag, TrainState.apply_loss(axis_name=) and the NNX
  helper. The value_fn route's rule refuses it now, on a refresh step, on a step that does not
  refresh (refresh=False, and the lax.cond of update_freq=2), and with independent probes. A loss
  summed over an axis only the parameters are split over (tensor parallelism), one of invariant
  parameters (the global loss, tx without axis_name), and pmap (where the loss is right) pass."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from jax.sharding import PartitionSpec as P

  import adahessian_jax as ah
  import adahessian_jax.nnx as ah_nnx
  from adahessian_jax import distributed, linen, spatial

  auto = (jax.sharding.AxisType.Auto,) * 2
  mesh = jax.make_mesh((1, 1), ("data", "model"), axis_types=auto, devices=jax.devices()[:1])
  params = {"w": jnp.ones((3, 2))}
  x = jnp.arange(12.0).reshape(4, 3) / 10
  pmean = lambda loss: jax.lax.pmean(loss, "data")
  own = lambda loss: loss

  def loss_fn(p, x, reduce=own):
    return reduce(jnp.mean(jnp.tanh(x @ p["w"]) ** 2))

  def fused(reduce, has_aux=False, refresh=None, update_freq=1, independent=False, axis="data"):
    tx = ah.adahessian(0.1, axis_name=axis, update_freq=update_freq, independent_probes=independent)

    def step(params, state, x):
      def fun(p, x):
        loss = loss_fn(p, x, reduce)
        return (loss, loss) if has_aux else loss

      local = (params, state) if axis is None else distributed.device_varying((params, state), axis)
      probes = distributed.per_device_probe_state(local[1], axis) if independent else local[1]
      vgh = ah.value_grad_and_hessian_diag(fun, has_aux=has_aux, refresh=refresh)
      _, grads, hdiag = vgh(local[0], probes, x)
      grads = grads if axis is None else jax.lax.pmean(grads, axis)
      checks = {} if axis is None else {"expected_axis_name": axis}
      return tx.update(grads, state, params, hessian_diag=hdiag, refresh=refresh, **checks)[0]

    specs = (P(), P(), P("data"))
    return jax.jit(jax.shard_map(step, mesh=mesh, in_specs=specs, out_specs=P()))(
      params, tx.init(params), x
    )

  def apply_loss(reduce):
    state = linen.TrainState.create(
      apply_fn=None, params=params, tx=ah.adahessian(0.1, axis_name="data")
    )
    step = lambda s, x: s.apply_loss(lambda p, x: loss_fn(p, x, reduce), x, axis_name="data")[0]
    specs = (P(), P("data"))
    return jax.jit(jax.shard_map(step, mesh=mesh, in_specs=specs, out_specs=P()))(state, x).params

  def nnx_step(reduce):
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0), param_dtype=jnp.float64)
    optimizer = nnx.Optimizer(model, ah.adahessian(0.1, axis_name="data"), wrt=nnx.Param)

    def step(model, optimizer, x):
      loss = lambda m, x: reduce(jnp.mean(jnp.tanh(m(x)) ** 2))
      _, grads, hdiag = ah_nnx.value_grad_and_hessian_diag(
        loss, model, optimizer, x, axis_name="data"
      )
      optimizer.update(model, grads, hessian_diag=hdiag, expected_axis_name="data")

    specs = (P(), P(), P("data"))
    nnx.jit(nnx.shard_map(step, mesh=mesh, in_specs=specs, out_specs=None))(model, optimizer, x)

  want = fused(own)  # the updates
  np.testing.assert_allclose(fused(pmean, axis=None)["w"], want["w"], rtol=1e-12)  # global loss
  np.testing.assert_allclose(apply_loss(own)["w"], params["w"] + want["w"], rtol=1e-12)
  nnx_step(own)
  match = (
    r"value_grad_and_hessian_diag: the loss function returns the same loss on every device of "
    r"mesh axis 'data' \(it is reduced over the axis.*Return this device's loss and reduce "
    r"outside: pmean the returned loss and gradients"
  )
  refused = [
    lambda: fused(pmean),
    lambda: fused(lambda loss: jax.lax.psum(loss, "data")),
    lambda: fused(pmean, has_aux=True),
    lambda: fused(pmean, refresh=False, update_freq=2),
    lambda: fused(pmean, update_freq=2),
    lambda: fused(pmean, independent=True),
    lambda: apply_loss(pmean),
    lambda: nnx_step(pmean),
  ]
  for call in refused:
    with pytest.raises(ValueError, match=match):
      call()

  # Tensor parallelism: a loss summed over the axis the kernel is split over is right.
  tx = ah.adahessian(0.1, axis_name="data", averaging=spatial.none())
  state = tx.init(params)
  split = {"w": P(None, "model")}
  state_specs = jax.tree.map(lambda _: P(), state)
  state_specs = (state_specs[0]._replace(mu=split, nu=split), *state_specs[1:])

  def split_step(params, state, x):
    loss = lambda p, x: jax.lax.psum(jnp.sum(jnp.tanh(x @ p["w"]) ** 2), "model")
    local = distributed.device_varying((params, state), "data")
    _, grads, hdiag = ah.value_grad_and_hessian_diag(loss)(*local, x)
    grads = jax.lax.pmean(grads, "data")
    return tx.update(grads, state, params, hessian_diag=hdiag, expected_axis_name="data")[0]

  in_specs = (split, state_specs, P("data"))
  jax.jit(jax.shard_map(split_step, mesh=mesh, in_specs=in_specs, out_specs=split))(
    params, state, x
  )

  # pmap: nothing varies, and the pmean-ed loss gives one device's.
  def pmap_step(params, state, x):
    local = distributed.device_varying((params, state), "data")
    _, grads, hdiag = ah.value_grad_and_hessian_diag(lambda p, x: loss_fn(p, x, pmean))(*local, x)
    grads = jax.lax.pmean(grads, "data")
    return tx.update(grads, state, params, hessian_diag=hdiag, expected_axis_name="data")[0]

  replicated = distributed.replicate((params, state), "data", devices=jax.devices()[:1])
  got = jax.pmap(pmap_step, axis_name="data", devices=jax.devices()[:1])(*replicated, x[None])
  np.testing.assert_allclose(got["w"][0], want["w"], rtol=1e-12)


def test_fused_route_refuses_params_device_varying_beside_a_state_that_is_not():
  """``vgh(distributed.device_varying(params, "data"), opt_state, ...)`` (the value_fn route's
  recipe for the gradient) drew each device's own probes, folded over the axis as a split
  parameter's are: 8 devices, the averaged estimate of w's entries 1.70, 1.58, 0.73, 0.08 times
  one device's on the global batch, with tx built for the same probes and no error (and a loss
  pmean-ed over the axis passed unseen). Refused now, naming the leaf and the axis; the state
  made device-varying with the params, or its key folded by per_device_probe_state (its
  docstring's recipe), and a leaf split over an axis its moments are split over too, pass."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import PartitionSpec as P

  import adahessian_jax as ah
  from adahessian_jax import distributed, spatial

  auto = (jax.sharding.AxisType.Auto,) * 2
  mesh = jax.make_mesh((1, 1), ("data", "model"), axis_types=auto, devices=jax.devices()[:1])
  params = {"b": jnp.zeros(2), "w": jnp.ones((3, 2))}
  split = {"b": P(), "w": P(None, "model")}
  x = jnp.arange(12.0).reshape(4, 3) / 10
  tx = ah.adahessian(0.1, axis_name="data", averaging=spatial.none())
  state = tx.init(params)
  state_specs = jax.tree.map(lambda _: P(), state)
  state_specs = (state_specs[0]._replace(mu=split, nu=split), *state_specs[1:])

  def loss(p, x):
    return jax.lax.psum(jnp.sum(jnp.tanh(x @ p["w"] + p["b"]) ** 2), "model")

  def run(inputs):
    def step(params, state, x):
      _, _, hdiag = ah.value_grad_and_hessian_diag(loss)(*inputs(params, state), x)
      return jax.lax.pmean(hdiag, "data")

    specs = (split, state_specs, P("data"))
    return jax.jit(jax.shard_map(step, mesh=mesh, in_specs=specs, out_specs=split))(
      params, state, x
    )

  varying = lambda tree: distributed.device_varying(tree, "data")
  run(lambda p, s: varying((p, s)))
  run(lambda p, s: (varying(p), distributed.per_device_probe_state(s, "data")))
  match = (
    r"value_grad_and_hessian_diag: the parameter at \['b'\] varies over mesh axis 'data' \(made "
    r"device-varying.*device_varying\(\(params, opt_state\), 'data'\)"
  )
  with pytest.raises(ValueError, match=match):
    run(lambda p, s: (varying(p), s))


def test_fused_route_names_params_left_invariant_beside_per_device_probes():
  """``vgh(params, distributed.per_device_probe_state(opt_state, "data"), ...)`` under shard_map
  at the replicated params failed inside the product with JAX's "pvary is a invariant->variant
  collective ... Got axes=('data',) and jax.typeof(inp)=float64[3,2]{V:data}", naming neither
  the leaf nor the fix. Refused before the product, naming both."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import PartitionSpec as P

  import adahessian_jax as ah
  from adahessian_jax import distributed

  mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  tx = ah.adahessian(0.1, axis_name="data", independent_probes=True)
  params = {"b": jnp.zeros(2), "w": jnp.ones((3, 2))}
  x = jnp.arange(12.0).reshape(4, 3) / 10

  def step(params, state, x):
    probes = distributed.per_device_probe_state(state, "data")
    loss = lambda p, x: jnp.mean(jnp.tanh(x @ p["w"] + p["b"]) ** 2)
    _, _, hdiag = ah.value_grad_and_hessian_diag(loss)(params, probes, x)
    return jax.lax.pmean(hdiag, "data")

  mapped = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), P(), P("data")), out_specs=P()))
  match = (
    r"value_grad_and_hessian_diag: the opt_state's PRNG key varies over mesh axis 'data' .*but "
    r"the parameter at \['b'\] does not.*distributed.device_varying\(\(params, opt_state\), "
    r"'data'\)"
  )
  with pytest.raises(ValueError, match=match):
    mapped(params, tx.init(params), x)


def test_tx_with_axis_name_refuses_an_estimate_the_same_on_every_device_of_the_axis():
  """The fused route at params and opt_state left replicated (``device_varying`` forgotten),
  with this device's loss, under shard_map: JAX differentiates the sum of the devices' losses, so
  the gradient and the estimate were P times the global batch's, silently (4 devices: both 4.0x
  one device's on the global batch; tx's average over axis_name changed nothing). tx refuses the
  estimate now, naming the leaf, the axis and the fix, on a refresh step and in the lax.cond of
  update_freq=2. The recipe (device_varying), a step that does not refresh (refresh=False, whose
  estimate tx does not read), the global batch's estimate given to tx without axis_name, pmap and
  check_vma=False (where nothing is seen to vary) pass."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import PartitionSpec as P

  import adahessian_jax as ah
  from adahessian_jax import distributed

  mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  params = {"b": jnp.zeros(2), "w": jnp.ones((3, 2))}
  x = jnp.arange(12.0).reshape(4, 3) / 10
  loss = lambda p, x: jnp.mean(jnp.tanh(x @ p["w"] + p["b"]) ** 2)

  def run(varying=True, axis="data", refresh=None, update_freq=1, check_vma=True):
    tx = ah.adahessian(0.1, axis_name=axis, update_freq=update_freq)

    def step(params, state, x):
      local = distributed.device_varying((params, state), "data") if varying else (params, state)
      _, grads, hdiag = ah.value_grad_and_hessian_diag(loss, refresh=refresh)(*local, x)
      grads = jax.lax.pmean(grads, "data")
      return tx.update(grads, state, params, hessian_diag=hdiag, refresh=refresh)[0]

    specs = (P(), P(), P("data"))
    mapped = jax.shard_map(step, mesh=mesh, in_specs=specs, out_specs=P(), check_vma=check_vma)
    return jax.jit(mapped)(params, tx.init(params), x)

  def single(params, state, x):  # one device, the global batch
    _, grads, hdiag = ah.value_grad_and_hessian_diag(loss)(params, state, x)
    return ah.adahessian(0.1).update(grads, state, params, hessian_diag=hdiag)[0]

  want = jax.jit(single)(params, ah.adahessian(0.1).init(params), x)
  np.testing.assert_allclose(run()["w"], want["w"], rtol=1e-6)
  np.testing.assert_allclose(run(varying=False, axis=None)["w"], want["w"], rtol=1e-6)
  np.testing.assert_allclose(run(varying=False, check_vma=False)["w"], want["w"], rtol=1e-6)
  run(varying=False, refresh=False, update_freq=2)
  run(update_freq=2)
  match = (
    r"scale_by_adahessian: hessian_diag at \['b'\] is the same on every device of mesh axis "
    r"'data' .*axis_name='data'.*P times the global batch's.*"
    r"distributed.device_varying\(\(params, opt_state\), 'data'\).*build tx without axis_name"
  )
  for call in (lambda: run(varying=False), lambda: run(varying=False, update_freq=2)):
    with pytest.raises(ValueError, match=match):
      call()

  def pmap_step(params, state, x):
    _, grads, hdiag = ah.value_grad_and_hessian_diag(loss)(params, state, x)
    grads = jax.lax.pmean(grads, "data")
    return ah.adahessian(0.1, axis_name="data").update(grads, state, params, hessian_diag=hdiag)[0]

  replicated = distributed.replicate(
    (params, ah.adahessian(0.1).init(params)), "data", devices=jax.devices()[:1]
  )
  got = jax.pmap(pmap_step, axis_name="data", devices=jax.devices()[:1])(*replicated, x[None])
  np.testing.assert_allclose(got["w"][0], want["w"], rtol=1e-6)


def test_estimate_the_same_on_every_device_is_refused_through_every_wrapper_and_recipe_passes():
  """The refusal of an estimate that does not vary over ``axis_name`` (the fused route with
  ``device_varying`` forgotten: 4x the global batch's on 4 devices) reaches ``scale_by_adahessian``
  inside ``optax.masked``, ``multi_transform``, ``optax.flatten``, ``MultiSteps``,
  ``apply_if_finite``, ``inject_hyperparams`` and a chain; the recipe passes there, and where the
  step maps over part of the mesh (``axis_names=``), ``vmap``s an ensemble inside ``shard_map``
  or holds a leaf the loss does not read (measured on 4 devices: every one refused, or within
  8e-16 of one device in float64). Traced only: the check adds nothing to the program."""
  import jax
  import jax.numpy as jnp
  import optax
  from jax.flatten_util import ravel_pytree
  from jax.sharding import PartitionSpec as P

  import adahessian_jax as ah
  from adahessian_jax import distributed

  auto = (jax.sharding.AxisType.Auto,) * 2
  mesh = jax.make_mesh((1, 1), ("data", "model"), axis_types=auto, devices=jax.devices()[:1])
  params = {"b": jnp.zeros(2), "unread": jnp.ones(3), "w": jnp.ones((3, 2))}
  x = jnp.arange(12.0).reshape(4, 3) / 10
  loss = lambda p, x: jnp.mean(jnp.tanh(x @ p["w"] + p["b"]) ** 2)
  labels = {"b": "ah", "unread": "sgd", "w": "ah"}
  a = lambda: ah.adahessian(0.1, axis_name="data")
  wrapped = {
    "plain": a,
    "masked": lambda: optax.masked(a(), jax.tree.map(lambda label: label == "ah", labels)),
    "multi_transform": lambda: optax.multi_transform({"ah": a(), "sgd": optax.sgd(0.1)}, labels),
    "flatten": lambda: optax.flatten(a()),
    "MultiSteps": lambda: optax.MultiSteps(a(), 1),
    "apply_if_finite": lambda: optax.apply_if_finite(a(), 3),
    "inject_hyperparams": lambda: optax.inject_hyperparams(ah.adahessian)(0.1, axis_name="data"),
    "chain": lambda: optax.chain(optax.clip_by_global_norm(1.0), a()),
  }

  def trace(tx, varying, axis_names=frozenset(mesh.axis_names), ensemble=False, ravel=False):
    def one(p, s, x):
      local = distributed.device_varying((p, s), "data") if varying else (p, s)
      _, grads, hdiag = ah.value_grad_and_hessian_diag(loss)(*local, x)
      hdiag = ravel_pytree(hdiag)[0] if ravel else hdiag
      return tx.update(jax.lax.pmean(grads, "data"), s, p, hessian_diag=hdiag)[0]

    step = jax.vmap(one, in_axes=(0, 0, None)) if ensemble else one
    mapped = jax.shard_map(
      step, mesh=mesh, in_specs=(P(), P(), P("data")), out_specs=P(), axis_names=axis_names
    )
    ps = jax.tree.map(lambda v: jnp.stack([v, 2 * v]), params) if ensemble else params
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", UserWarning)  # optax.flatten's, at init
      state = jax.vmap(tx.init)(ps) if ensemble else tx.init(ps)
    return jax.eval_shape(mapped, ps, state, x)

  match = r"hessian_diag at .* is the same on every device of mesh axis 'data'"
  for name, make in wrapped.items():
    trace(make(), varying=True, ravel=name == "flatten")
    with pytest.raises(ValueError, match=match):
      trace(make(), varying=False, ravel=name == "flatten")
  for how in ({"axis_names": {"data"}}, {"ensemble": True}):
    trace(a(), varying=True, **how)
    with pytest.raises(ValueError, match=match):
      trace(a(), varying=False, **how)


def test_fold_in_axis_index_refuses_what_is_not_raw_key_data_naming_it():
  """A typed key failed with JAX's "invalid PRNG key data: expected key_data.ndim >= 1", an int32
  array with "expected key_data.dtype = uint32", and a whole optimizer state printed the state."""
  import jax
  import jax.numpy as jnp

  import adahessian_jax as ah
  from adahessian_jax import distributed

  state = ah.adahessian(0.1).init({"w": jnp.ones(2)})
  with pytest.raises(TypeError, match=r"got dtype key<\w+>: pass jax.random.key_data\(keys\)"):
    distributed.fold_in_axis_index(jax.random.key(0), "data")
  with pytest.raises(TypeError, match=r"got dtype int32: pass the AdaHessian state's key"):
    distributed.fold_in_axis_index(jnp.zeros((1, 2), jnp.int32), "data")
  with pytest.raises(TypeError, match=r"got a tuple: .*per_device_probe_state\(opt_state, axis"):
    distributed.fold_in_axis_index(state, "data")
  folded = jax.vmap(
    lambda _: distributed.fold_in_axis_index(state[0].key, "data"), axis_name="data"
  )
  assert len({tuple(k.ravel().tolist()) for k in folded(jnp.arange(3))}) == 3


def test_fold_in_axis_index_refuses_key_data_of_another_shape_naming_it():
  """uint32 data that is not one key per row (a scalar, a row of 3 words) failed with JAX's
  "invalid PRNG key data: expected key_data.ndim >= 1" (or "shape to end with (2,)"), naming
  neither the argument nor the fix."""
  import jax
  import jax.numpy as jnp

  from adahessian_jax import distributed

  for shape in [(), (3,), (4, 3)]:
    with pytest.raises(
      ValueError, match=rf"fold_in_axis_index .* got shape {re.escape(str(shape))}: pass"
    ):
      distributed.fold_in_axis_index(jnp.zeros(shape, jnp.uint32), "data")
  folded = jax.vmap(lambda k: distributed.fold_in_axis_index(k, "data"), axis_name="data")
  assert folded(jnp.zeros((3, 2), jnp.uint32)).shape == (3, 2)  # one key per device


def test_vmap_with_axis_name_under_jit_steps_like_one_device_on_the_global_batch():
  """``jax.vmap(step, axis_name=)`` simulates data parallelism on one device; under ``jit`` (and
  ``eval_shape``) ``device_varying`` failed with JAX's bare ``AssertionError`` from a cast over
  the vmap axis, which is no mesh axis. Both routes, as the one-device step on the whole batch."""
  import jax
  import jax.numpy as jnp

  import adahessian_jax as ah
  from adahessian_jax import distributed, fused

  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32), "b": jnp.zeros(2)}
  x = jnp.asarray(rng.normal(size=(4, 5, 3)), jnp.float32)  # 4 "devices" x 5 examples

  def loss(p, xb):
    return jnp.mean(jnp.tanh(xb @ p["w"] + p["b"]) ** 2)

  def closure_step(xb):
    tx = ah.adahessian(0.1, axis_name="d")
    grads = jax.lax.pmean(jax.grad(loss)(params, xb), "d")
    return tx.update(grads, tx.init(params), params, value_fn=lambda p: loss(p, xb))[0]

  def fused_step(xb):
    tx = ah.adahessian(0.1, axis_name="d")
    state = tx.init(params)
    vgh = fused.value_grad_and_hessian_diag(lambda p: loss(p, xb))
    _, grads, hdiag = vgh(*distributed.device_varying((params, state), "d"))
    grads = jax.lax.pmean(grads, "d")
    return tx.update(grads, state, params, hessian_diag=hdiag, expected_axis_name="d")[0]

  tx = ah.adahessian(0.1)
  xs = x.reshape(20, 3)

  @jax.jit  # the reference: one program, not op by op (128 compiles)
  def one_device_step(xs):
    grads = jax.grad(loss)(params, xs)
    return tx.update(grads, tx.init(params), params, value_fn=lambda p: loss(p, xs))[0]

  want = one_device_step(xs)
  for step in (closure_step, fused_step):
    mapped = jax.vmap(step, axis_name="d")
    for got in (mapped(x), jax.jit(mapped)(x)):
      for k in want:
        np.testing.assert_allclose(got[k], np.broadcast_to(want[k], got[k].shape), rtol=2e-5)
    assert jax.eval_shape(mapped, x)["w"].shape == (4, 3, 2)


def test_state_shardings_names_the_leaf_without_a_sharding():
  import jax
  import jax.numpy as jnp

  import adahessian_jax as ah
  from adahessian_jax import distributed

  params = {"a": jnp.ones(2), "b": {"c": jax.ShapeDtypeStruct((2,), jnp.float32)}}
  with pytest.raises(TypeError, match=r"ShapeDtypeStruct without one at \['b'\]\['c'\]"):
    distributed.state_shardings(ah.adahessian(0.1), params)


def test_state_shardings_refuses_a_replicated_or_tx_it_cannot_use_naming_it():
  """``replicated=`` was put into the result as given: a string or a Mesh became the step count's
  "sharding" (``jit`` failed later naming ``result[0].count``), and ``PartitionSpec('d')`` split
  the scalars; the optimizer's state in place of ``tx`` failed with "the first argument must be
  callable"."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec

  import adahessian_jax as ah
  from adahessian_jax import distributed

  mesh = jax.make_mesh((1,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
  params = {"w": jax.device_put(jnp.ones((4, 6)), NamedSharding(mesh, PartitionSpec(None, "d")))}
  tx = ah.adahessian(0.1)
  with pytest.raises(TypeError, match=r"replicated='replicated' is a str, not a jax.sharding"):
    distributed.state_shardings(tx, params, replicated="replicated")
  with pytest.raises(TypeError, match=r"is a Mesh, .*\(wrap it: NamedSharding\(mesh, Partition"):
    distributed.state_shardings(tx, params, replicated=mesh)
  with pytest.raises(ValueError, match=r"replicated=P\('d',\) splits values"):
    distributed.state_shardings(tx, params, replicated=PartitionSpec("d"))
  with pytest.raises(
    TypeError, match=r"tx is a tuple, not an optimizer .* state_shardings\(tx, params"
  ):
    distributed.state_shardings(tx.init(params), params)
  # A PartitionSpec that replicates is what jit takes under jax.set_mesh.
  assert distributed.state_shardings(tx, params, replicated=PartitionSpec())[0].count == (
    PartitionSpec()
  )


def test_max_replica_difference_compares_typed_prng_keys_by_their_data():
  """A typed key in a user's state (a dropout key) raised JAX's 'PRNGKey dtype cannot be
  converted to a NumPy array' without naming anything."""
  import jax
  import jax.numpy as jnp

  from adahessian_jax import distributed

  same = jnp.stack([jax.random.key(3)] * 2)
  assert distributed.max_replica_difference({"k": same, "x": jnp.ones((2, 3))}, stacked=True) == 0
  apart = jax.random.split(jax.random.key(3), 2)
  assert distributed.max_replica_difference({"k": apart}, stacked=True) > 0
  assert distributed.max_replica_difference({"k": jax.random.key(3)}) == 0.0


def test_state_shardings_of_a_state_with_masked_out_parameters():
  """``optax.masked`` (a leaf mask, or a prefix standing for a subtree) puts ``MaskedNode`` where
  parameters are left out; state_shardings failed on it with optax's tree-structure error."""
  import jax
  import jax.numpy as jnp
  import optax
  from jax.sharding import NamedSharding, PartitionSpec

  import adahessian_jax as ah
  from adahessian_jax import distributed

  mesh = jax.make_mesh((1,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
  split, whole = NamedSharding(mesh, PartitionSpec(None, "d")), NamedSharding(mesh, PartitionSpec())
  sds = lambda shape, sh: jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sh)
  params = {"w": sds((4, 6), split), "head": {"k": sds((6, 2), split), "b": sds((2,), whole)}}
  for mask in ({"w": True, "head": {"k": False, "b": False}}, {"w": True, "head": False}):
    tx = optax.chain(optax.masked(ah.scale_by_adahessian(), mask), optax.scale(-0.1))
    shardings = distributed.state_shardings(tx, params)
    abstract = jax.eval_shape(tx.init, params)
    assert jax.tree.structure(shardings) == jax.tree.structure(abstract), mask
    inner = shardings[0].inner_state
    assert inner.mu["w"] == split and inner.nu["w"] == split
    assert isinstance(inner.mu["head"], optax.MaskedNode) or isinstance(
      inner.mu["head"]["k"], optax.MaskedNode
    )
    concrete = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), params)
    state = jax.jit(tx.init, out_shardings=shardings)(concrete)
    assert state[0].inner_state.mu["w"].sharding == split


def test_state_shardings_with_averaging_given_per_leaf():
  """``averaging`` as a pytree prefix of the params: init checked it against the leafless
  placeholder that ``optax.tree.map_params`` passes, and state_shardings raised "its entries
  ['b'], ['w'] are not in the params"."""
  import jax
  import jax.numpy as jnp
  import optax
  from jax.sharding import NamedSharding, PartitionSpec

  import adahessian_jax as ah
  from adahessian_jax import distributed, spatial

  mesh = jax.make_mesh((1,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
  split, whole = NamedSharding(mesh, PartitionSpec(None, "d")), NamedSharding(mesh, PartitionSpec())
  params = {"w": jax.device_put(jnp.ones((4, 6)), split), "b": jax.device_put(jnp.ones(6), whole)}
  tx = ah.adahessian(0.1, averaging={"w": spatial.blocks(2), "b": None})
  shardings = distributed.state_shardings(tx, params)
  assert shardings[0].mu == {"w": split, "b": whole} and shardings[0].key == whole
  assert optax.tree.map_params(tx, jnp.shape, tx.init(params))[0].nu == {"w": (4, 6), "b": (6,)}
  with pytest.raises(ValueError, match=r"entries \['v'\] are not in the params"):
    ah.adahessian(0.1, averaging={"v": None}).init(params)  # a real tree is still checked


def test_state_shardings_of_a_state_holding_the_params_flattened():
  """``optax.flatten``'s init concatenates the leaves, and ``optax.tree.map_params`` calls it on
  a placeholder without any: state_shardings raised NumPy's "Need at least one array to
  concatenate", naming nothing. The flattened vectors are replicated now, and the params-shaped
  moments of another transform in the chain still follow the params."""
  import jax
  import jax.numpy as jnp
  import optax
  from jax.sharding import NamedSharding, PartitionSpec

  import adahessian_jax as ah
  from adahessian_jax import distributed

  mesh = jax.make_mesh((1,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
  split, whole = NamedSharding(mesh, PartitionSpec("d")), NamedSharding(mesh, PartitionSpec())
  params = {"w": jax.device_put(jnp.ones((4, 6)), split), "b": jax.device_put(jnp.ones(6), whole)}
  tx = optax.chain(optax.flatten(ah.scale_by_adahessian(update_freq=2)), optax.scale_by_adam())
  with pytest.warns(UserWarning, match="optax.flatten"):
    shardings = distributed.state_shardings(tx, params)
    state = jax.jit(tx.init, out_shardings=shardings)(params)
  flat, adam = shardings
  assert flat.mu == flat.nu == flat.hessian == flat.key == flat.count == whole
  assert adam.mu == adam.nu == {"w": split, "b": whole} and adam.count == whole
  assert state[0].mu.shape == (30,) and state[1].mu["w"].sharding == split


def test_state_shardings_with_a_weight_decay_mask_given_as_a_tree():
  """``weight_decay_mask`` as a pytree of booleans: init checked it against the leafless
  placeholder that ``optax.tree.map_params`` passes, and state_shardings raised "weight_decay_mask
  has an entry at ['b'], where the params have none" (``optax.adamw`` with the mask works)."""
  import jax
  import jax.numpy as jnp
  import optax
  from jax.sharding import NamedSharding, PartitionSpec

  import adahessian_jax as ah
  from adahessian_jax import distributed

  mesh = jax.make_mesh((1,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
  split, whole = NamedSharding(mesh, PartitionSpec(None, "d")), NamedSharding(mesh, PartitionSpec())
  params = {"w": jax.device_put(jnp.ones((4, 6)), split), "b": jax.device_put(jnp.ones(6), whole)}
  tx = ah.adahessian(0.1, weight_decay=0.1, weight_decay_mask={"w": True, "b": False})
  shardings = distributed.state_shardings(tx, params)
  assert shardings[0].mu == {"w": split, "b": whole} and shardings[0].key == whole
  assert optax.tree.map_params(tx, jnp.shape, tx.init(params))[0].nu == {"w": (4, 6), "b": (6,)}
  with pytest.raises(ValueError, match=r"weight_decay_mask has an entry at \['v'\]"):
    ah.adahessian(0.1, weight_decay_mask={"v": True, "w": True, "b": False}).init(params)


def test_tensor_parallel_fused_route_equals_value_fn_route(tensor_parallel):
  """The same probes, so the same updates; the replicated leaf flattens first and receives the
  fused route's NaN mark, which was computed per shard (``shard_map`` refused the replicated
  bias's update as output)."""
  r = tensor_parallel
  assert r["fused_vs_value_fn_update"] <= 1e-12 and r["fused_max_update"] > 0.01, r


def test_tensor_parallel_curvature_floor_uses_the_whole_model(tensor_parallel):
  """A leaf without curvature is floored by the model-wide mean; it was each shard's own (the
  replicated bias's update varied over the model axis, and ``shard_map`` refused it)."""
  r = tensor_parallel
  assert r["floored_b0_vs_single"] <= 1e-12 and abs(r["floored_b0"]) > 1e-3, r


def test_tensor_parallel_curvature_clip_uses_the_whole_model(tensor_parallel):
  """A spike scaled down by ``curvature_clip`` under ``shard_map`` with split kernels: the same
  updates as on one device (the model's means take in every shard), and not the unclipped ones."""
  r = tensor_parallel
  assert r["spike_clipped_vs_single"] <= 1e-12 and r["spike_clip_effect"] > 1e-3, r


def test_jit_fsdp_on_a_mesh_with_explicit_axes(four_devices):
  # jax.make_mesh gives Explicit axes by default; with a kernel sharded over one, the
  # Hessian-vector product used to fail inside JAX with a bare AssertionError. fused_2d_*: on a
  # (data, model) mesh the fused route's gradient of a split bias was wrong (Auto axes: XLA
  # miscompiled a scatter) or failed to trace (Explicit axes). blocks: block_size over a split
  # axis failed to trace. plain_init: a state from tx.init(params) had nu without the params'
  # shardings, and every update failed. mean_over_split_*: a mean over a split axis came back
  # whole along it, unlike nu, and every update failed. blocks_in_shards*: blocks within the
  # shards were averaged after gathering D whole. (_explicit_mesh_worker.py, float64.)
  diffs = dict(line.split() for line in _section_stdout(four_devices, "explicit_mesh").splitlines())
  assert set(diffs) == {
    "value_fn",
    "fused",
    "plain_init",
    "blocks",
    "fused_2d_Auto",
    "fused_2d_Explicit",
    "fused_bf16_dp",
    "mean_over_split_k1",
    "mean_over_split_k2",
    "blocks_in_shards",
    "blocks_in_shards_extra_gathers",
  }
  assert all(float(d) <= 1e-12 for d in diffs.values()), diffs
  assert diffs["blocks_in_shards_extra_gathers"] == "0", diffs


def test_multi_process_orbax_checkpoint_resumes_bit_identically_in_fresh_processes(
  multi_host_run, tmp_path
):
  """2 processes x 2 devices (those of the multi-host checks, in a section before them) save
  params and state with orbax after 5 steps (mid-way between lazy refreshes); 2 fresh processes
  restore them with sharded ShapeDtypeStruct targets and train on: every leaf (probe keys, stored
  Hessian, moments) equals the uninterrupted run's, bit for bit, for FSDP under jit (stabilizers,
  schedule, 2 probes) and shard_map with independent probes."""
  if not _has_orbax():
    pytest.skip("orbax-checkpoint is not installed")
  straight = _multi_host_section(
    multi_host_run, "checkpoint", [f"straight_{i}.npz" for i in range(2)]
  )
  ckpt = multi_host_run[0] / "ckpt"
  port = str(_free_port())
  cmds = [
    ["_multihost_checkpoint_worker.py", str(i), "2", port, "resume", str(ckpt), str(tmp_path)]
    for i in range(2)
  ]
  _run_all(cmds, 2, TIMEOUT_S, str(tmp_path))
  straight = [np.load(path) for path in straight]
  resumed = [np.load(tmp_path / f"resume_{i}.npz") for i in range(2)]
  names = straight[0].files
  assert len(names) == 35 and all(sorted(r.files) == sorted(names) for r in (*straight, *resumed))
  for name in names:
    for run in (straight[1], *resumed):
      np.testing.assert_array_equal(run[name], straight[0][name], err_msg=name)
  assert straight[0]["jit_fsdp['opt_state'][0].count"] == 10
  assert np.abs(straight[0]["jit_fsdp['opt_state'][0].hessian['b1']"]).max() > 0
  assert straight[0]["shard_map_independent['opt_state'][0].key"].shape == (1, 2)


def test_replicated_params_and_state_compile_the_pmapped_step_once(four_devices):
  # pmap keys its programs on its inputs' placement. On recent JAX (0.10) it places its outputs
  # as a NamedSharding over a mesh axis named axis_name, so copies stacked with np/jnp
  # broadcast_to (the README's recipe) compiled the step again at its second call.
  # distributed.replicate places them as pmap does. Needs jax.monitoring's listener removal
  # (newer than the jax 0.7.0 floor) through CompileCounter. (_distributed_worker.main_replicate.)
  stdout = _section_stdout(four_devices, "replicate")
  rows = {name: rest for name, *rest in map(str.split, stdout.splitlines())}
  assert rows.pop("split") == ["True"], stdout  # a leaf split over devices: refused
  assert set(rows) == {"adahessian", "adam"}, stdout
  for name, (compiles, same, drift) in rows.items():
    assert int(compiles) == 0, (name, stdout)
    assert float(same) == 0.0 and float(drift) == 0.0, (name, stdout)


def test_replicate_refuses_bad_axis_names_and_devices_naming_them():
  import jax

  from adahessian_jax import distributed

  tree = {"w": np.ones(3)}
  device = jax.devices()[0]
  # Was "unhashable type: 'list'" from inside pmap, without the value.
  with pytest.raises(TypeError, match=r"axis_name=\['batch'\] is a list, not hashable"):
    distributed.replicate(tree, ["batch"])
  # Was an AttributeError ('str' object has no attribute 'process_index').
  with pytest.raises(TypeError, match=r"devices\[0\] is 'cpu:0', a str, not a jax.Device"):
    distributed.replicate(tree, "batch", devices=["cpu:0"])
  # Was "the input arrays must be from distinct devices", from inside pmap.
  with pytest.raises(ValueError, match=r"devices\[1\], .* is listed twice"):
    distributed.replicate(tree, "batch", devices=[device, device])
  with pytest.raises(ValueError, match=r"none of devices=\[\] belongs to this process"):
    distributed.replicate(tree, "batch", devices=[])
  # Was "'Device' object is not iterable", naming no argument.
  with pytest.raises(
    TypeError, match=rf"devices={re.escape(repr(device))} is a \w+, not a sequence"
  ):
    distributed.replicate(tree, "batch", devices=device)


def test_replicate_refuses_axis_names_and_leaves_pmap_cannot_use_naming_them():
  """An integer, tuple or other non-str axis_name failed inside pmap with an MLIR "get():
  incompatible function arguments" or "Resource axis: a of P(('a', 'b'),) is not found in mesh",
  and a str leaf with
  "... passed to the function at path flat_args[1]", naming neither the argument nor the leaf."""
  import jax
  import jax.numpy as jnp

  from adahessian_jax import distributed

  tree = {"w": jnp.ones(3)}
  with pytest.raises(ValueError, match=r"axis_name=0: 0 is an integer, which JAX's collectives"):
    distributed.replicate(tree, 0)
  with pytest.raises(ValueError, match=r"axis_name=\('a', 'b'\) is a tuple, but a pmap-ed step"):
    distributed.replicate(tree, ("a", "b"))
  # The same MLIR error for any name but a str, where pmap names a mesh axis with it (JAX 0.10).
  if getattr(jax.config, "jax_pmap_shmap_merge", True):
    for name in (1.5, b"batch"):
      match = rf"axis_name={name!r} is a {type(name).__name__}, but jax.pmap names a mesh axis"
      with pytest.raises(ValueError, match=match + " with it, which must be a str"):
        distributed.replicate(tree, name)
  with pytest.raises(TypeError, match=r"leaf at \['cfg'\]\['act'\] is str 'relu', not an array"):
    distributed.replicate({**tree, "cfg": {"act": "relu"}}, "batch")
  abstract = jax.ShapeDtypeStruct((2,), jnp.float32)
  with pytest.raises(TypeError, match=r"leaf at the root \(the tree is a single array\) is Shape"):
    distributed.replicate(abstract, "batch")
  with pytest.raises(TypeError, match=r"leaf at \[0\] is ndarray array\(\['a'\]"):
    distributed.replicate([np.array(["a"])], "batch")
  # What pmap takes still passes: NumPy arrays and scalars of numeric or boolean dtypes.
  out = distributed.replicate([np.ones(2, np.float32), np.int32(3), np.bool_(True)], "batch")
  n = jax.local_device_count()
  assert [x.shape for x in out] == [(n, 2), (n,), (n,)]


def test_replicate_refuses_a_tree_it_already_stacked_naming_the_leaf():
  import jax.numpy as jnp

  from adahessian_jax import distributed

  once = distributed.replicate({"w": jnp.ones(3), "b": None}, "batch")
  assert once["w"].shape == (1, 3) and once["b"] is None
  # On one device the second call stacked again, (1, 1, 3), with no error.
  with pytest.raises(ValueError, match=r"leaf at \['w'\] \(shape \(1, 3\)\) is stacked over"):
    distributed.replicate(once, "batch")
  # A tree that is one array names the root, as every error of the project does.
  with pytest.raises(ValueError, match=r"leaf at the root \(the tree is a single array\) \(shape"):
    distributed.replicate(distributed.replicate(jnp.ones(3), "batch"), "batch")


def test_replicate_makes_python_scalars_strongly_typed_so_the_step_compiles_once():
  """A Python float parameter (and adam's zeros like it) stayed weakly typed through replicate;
  the step's outputs are not, so the pmapped step compiled again at its second call."""
  import jax
  import jax.numpy as jnp
  import optax
  from conftest import CompileCounter

  from adahessian_jax import distributed

  tx = optax.adam(0.1)
  params = {"w": jnp.ones(3), "s": 1.0}

  def step(p, s, x):
    g = jax.lax.pmean(jax.grad(lambda q: jnp.sum((x * q["w"] * q["s"]) ** 2))(p), "batch")
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  pstep = jax.pmap(step, axis_name="batch")
  p, s = distributed.replicate((params, tx.init(params)), "batch")
  assert p["s"].dtype == jnp.result_type(1.0) and not p["s"].aval.weak_type
  x = jnp.ones((1, 3))
  p, s = jax.block_until_ready(pstep(p, s, x))
  with CompileCounter() as compiles:
    for _ in range(3):
      p, s = jax.block_until_ready(pstep(p, s, x))
  assert compiles.count == 0
  # The same 4 steps under vmap, on host copies: the same numbers.
  q, t = jax.tree.map(lambda a: np.stack([np.asarray(a)]), (params, tx.init(params)))
  for _ in range(4):
    q, t = jax.vmap(step, axis_name="batch")(q, t, x)
  np.testing.assert_allclose(np.asarray(p["s"]), np.asarray(q["s"]), rtol=1e-12)
  np.testing.assert_allclose(np.asarray(p["w"]), np.asarray(q["w"]), rtol=1e-12)
