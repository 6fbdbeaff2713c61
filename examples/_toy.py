"""The toy problem of the ``distributed_*`` examples: a tanh MLP 8 -> 32 -> 2 that fits ``sin``."""

import jax.numpy as jnp
import numpy as np


def loss_fn(params, x, y):
  """The mean squared error of the MLP ``params`` on inputs ``x`` and targets ``y``."""
  h = jnp.tanh(x @ params["w1"] + params["b1"])
  return jnp.mean((h @ params["w2"] + params["b2"] - y) ** 2)


def problem(rows: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
  """``(x, y, params)``: ``rows`` inputs and targets and the MLP's initial parameters.

  Float32 NumPy arrays, the same for a ``seed`` in every process (a real job reads its rows of
  the data from files).
  """
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(rows, 8)).astype(np.float32)
  y = np.sin(x[:, :2]).astype(np.float32)
  params = {
    "w1": (rng.normal(size=(8, 32)) / np.sqrt(8)).astype(np.float32),
    "b1": np.zeros(32, np.float32),
    "w2": (rng.normal(size=(32, 2)) / np.sqrt(32)).astype(np.float32),
    "b2": np.zeros(2, np.float32),
  }
  return x, y, params
