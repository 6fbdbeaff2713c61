"""Shared fixtures. Float64 is on for the whole test session: the tests compare
against exact references (dense Hessians, NumPy transcriptions) at 1e-10 and
below; float32 behaviour is tested with explicitly float32 arrays."""

import ast
import functools
import os
import pathlib
import subprocess
import sys

# The tests spend most of their time compiling small programs, so XLA:CPU compiles them fast
# rather than well: LLVM at optimisation level 0, and fusions through XLA's loop emitters instead
# of its MLIR fusion emitters (2.7x less compile time for a CNN's and an MLP's AdaHessian steps;
# the whole suite about half the CPU time). Both choose how the same HLO becomes machine code, so
# results agree to rounding; a comparison of two runs within the tests uses the same flags.
_WANTED_FLAGS = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")
# The flags this jaxlib accepts, found once per session and passed on to the workers.
_CHECKED_ENV = "ADAHESSIAN_JAX_TEST_FAST_COMPILE_FLAGS"


def _accepted_flags() -> tuple[str, ...]:
  """Those of ``_WANTED_FLAGS`` that this jaxlib knows (XLA aborts on an unknown flag).

  The fusion-emitter switch is a migration flag that a later XLA may drop; without it the tests
  are slower, not different.
  """
  if _CHECKED_ENV in os.environ:
    return tuple(os.environ[_CHECKED_ENV].split())

  def starts(flags):
    env = dict(os.environ, XLA_FLAGS=" ".join(flags), JAX_PLATFORMS="cpu")
    probe = [sys.executable, "-c", "import jax; jax.devices()"]
    return subprocess.run(probe, env=env, capture_output=True, check=False).returncode == 0

  # All at once first: one JAX start (~2.5 s before the workers start) where this jaxlib knows
  # them all; one flag at a time only where it refuses one.
  accepted = list(_WANTED_FLAGS) if starts(_WANTED_FLAGS) else []
  if not accepted:
    for flag in _WANTED_FLAGS:
      if starts([*accepted, flag]):
        accepted.append(flag)
  os.environ[_CHECKED_ENV] = " ".join(accepted)
  return tuple(accepted)


FAST_COMPILE_FLAGS = _accepted_flags()


def with_fast_compile(flags: str = "") -> str:
  """``flags`` (an ``XLA_FLAGS`` value) with each of :data:`FAST_COMPILE_FLAGS` it does not set.

  For a subprocess that sets ``XLA_FLAGS`` itself (a forced device count); one that inherits the
  environment has them already.
  """
  given = {f.split("=")[0] for f in flags.split()}
  missing = [f for f in FAST_COMPILE_FLAGS if f.split("=")[0] not in given]
  return " ".join([*flags.split(), *missing])


# Set before jax is imported; subprocesses inherit it.
os.environ["XLA_FLAGS"] = with_fast_compile(os.environ.get("XLA_FLAGS", ""))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_enable_x64", True)

# Fixture scopes wider than one test but narrower than the session: such a fixture (a subprocess
# run, a compiled problem) runs once in each worker process that runs a test using it.
_SHARED_SCOPES = frozenset({"class", "module", "package"})


@functools.cache
def _defines_shared_fixture(path):
  """Whether the test file at ``path`` defines a class-, module- or package-scoped fixture."""
  try:
    tree = ast.parse(pathlib.Path(path).read_text())
  except (OSError, SyntaxError):
    return False
  for node in ast.walk(tree):
    if isinstance(node, ast.Call) and ast.unparse(node.func).endswith("fixture"):
      for kw in node.keywords:
        if kw.arg == "scope" and getattr(kw.value, "value", None) in _SHARED_SCOPES:
          return True
  return False


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
  """pytest-xdist's default `--dist load` (what `-n 2` uses; CI runs `pytest -q -n 2`), except
  that the tests of a file that defines a class- or module-scoped fixture go to one worker
  together, so that the fixture (a subprocess run of an example, a compile) runs once instead of
  in every worker. Each other test is scheduled on its own and fills in around the groups
  (xdist >= 3.6 sends the groups out first, largest first). xdist's `--dist loadgroup` with
  xdist_group marks would do this, but with pytest >= 9.2 xdist 3.8 cannot add the group to the
  test ids and falls back to plain load. optionalhook: without pytest-xdist nothing here runs."""
  if config.getoption("dist") != "load":
    return None
  from xdist.scheduler import LoadScopeScheduling

  class SharedFixtureScheduling(LoadScopeScheduling):
    def _split_scope(self, nodeid):
      path = nodeid.split("::", 1)[0]
      return path if _defines_shared_fixture(config.rootpath / path) else nodeid

  return SharedFixtureScheduling(config, log)


@pytest.fixture
def rng():
  return np.random.default_rng(0)


@pytest.fixture
def mlp_problem():
  """A small tanh MLP with a batch of regression data, float64."""
  return make_mlp_problem()


@pytest.fixture
def cnn_problem():
  """A small Flax CNN (Conv (3,3,2,3) + Dense (108,3)) on 6x6x2 inputs, float64."""
  return make_cnn_problem()


def make_mlp_problem(seed=0):
  r = np.random.default_rng(seed)
  params = {
    "hidden": {"kernel": r.normal(size=(5, 4)) * 0.7, "bias": r.normal(size=(4,)) * 0.1},
    "out": {"kernel": r.normal(size=(4, 3)) * 0.7, "bias": np.zeros(3)},
  }
  params = jax.tree.map(jnp.asarray, params)
  x = jnp.asarray(r.normal(size=(16, 5)))
  y = jnp.asarray(r.normal(size=(16, 3)))

  def loss_fn(p, batch):
    xb, yb = batch
    h = jnp.tanh(xb @ p["hidden"]["kernel"] + p["hidden"]["bias"])
    return jnp.mean((h @ p["out"]["kernel"] + p["out"]["bias"] - yb) ** 2)

  return params, loss_fn, (x, y)


def make_cnn_problem(seed=0):
  import flax.linen as nn

  class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.tanh(nn.Conv(3, (3, 3), param_dtype=jnp.float64)(x))
      return nn.Dense(3, param_dtype=jnp.float64)(x.reshape((x.shape[0], -1)))

  r = np.random.default_rng(seed)
  x = jnp.asarray(r.normal(size=(4, 6, 6, 2)))
  labels = jnp.asarray(r.integers(0, 3, size=(4,)))
  model = CNN()
  params = model.init(jax.random.key(seed), x)["params"]

  def loss_fn(p, batch):
    xb, yb = batch
    logits = model.apply({"params": p}, xb)
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, yb[:, None], axis=1))

  return params, loss_fn, (x, labels)


def assert_trees_allclose(a, b, rtol=1e-12, atol=0.0):
  """Asserts two pytrees have the same structure and allclose leaves."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(
    lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol),
    a,
    b,
  )


class CompileCounter:
  """Counts XLA backend compilations (``jax.monitoring`` duration events) inside ``with``."""

  EVENT = "/jax/core/compile/backend_compile_duration"

  def __init__(self):
    self.count = 0

  def __call__(self, event, duration, **kwargs):
    if event == self.EVENT:
      self.count += 1

  def __enter__(self):
    jax.monitoring.register_event_duration_secs_listener(self)
    return self

  def __exit__(self, *exc):
    jax.monitoring.unregister_event_duration_listener(self)
