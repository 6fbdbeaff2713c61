"""A plain-NumPy transcription of AdaHessian (Algorithm 1 of Yao et al. 2021)
and the official PyTorch code's decoupled weight decay, written independently
of the library (no JAX), used as the reference in the tests.

Per step t (from 1), for every parameter array p with gradient g and raw
Hutchinson estimate e (z ⊙ Hz, averaged over probes):
  D = spatial_average(|e|)             (on refresh steps; else the last D)
  D = max(D, floor * mean(D))          (the curvature floor; floor = 0 is the paper's rule;
                                        an all-zero D takes the mean over all arrays instead)
  s = min(1, c * S / M)                (the curvature clip, none by default: M the root mean
  D = s * D,  g = s * g                 square of D over all arrays, S that of the curvature so
                                        far, sqrt(mean(v / (1 - b2^t'))) before this step's
                                        update of v, after t' of its steps; s = 1 when t' < 10;
                                        with lazy_moment="refresh" t' counts update_freq steps
                                        per refresh)
  m = b1 m + (1 - b1) g
  v = b2 v + (1 - b2) D²
  denom = (v / (1 - b2^t)) ** (k / 2) + eps
  u = clip(m / (1 - b1^t) / denom, -rho, rho)   (no clip by default)
  p = p - lr_t * (u + wd * p)

With lazy_moment="refresh", v moves on refresh steps only, v = b2^f v + (1 - b2^f) D²
(f = update_freq), and its bias correction is 1 - b2^(f·n) after n refreshes.
"""

import numpy as np


def block_average(d, block_size, axis=0):
  """Mean over blocks of consecutive entries along `axis`; a short last block
  is averaged over its own members. Written with an explicit loop."""
  d = np.moveaxis(np.array(d, dtype=np.float64), axis, 0)
  out = np.empty_like(d)
  for start in range(0, d.shape[0], block_size):
    block = d[start : start + block_size]
    out[start : start + block_size] = block.mean(axis=0)
  return np.moveaxis(out, 0, axis)


def flax_spatial_average(d, block_size):
  """The default rule on Flax layouts: 1-D none, 2-D (in, out) blocks along
  inputs, conv (*spatial, in, out) mean over the spatial positions."""
  d = np.asarray(d, dtype=np.float64)
  if d.ndim <= 1:
    return d.copy()
  if d.ndim == 2:
    return block_average(d, block_size, axis=0)
  spatial = tuple(range(d.ndim - 2))
  return np.broadcast_to(d.mean(axis=spatial, keepdims=True), d.shape).copy()


class AdaHessianReference:
  """The reference optimizer on a dict of NumPy arrays (flat: name -> array)."""

  def __init__(
    self,
    params,
    lr,
    b1=0.9,
    b2=0.999,
    eps=1e-4,
    wd=0.0,
    k=1.0,
    block_size=1,
    update_freq=1,
    floor=0.0,
    clip=None,
    lazy_moment="repeat",
    curvature_clip=None,
  ):
    self.p = {n: np.array(v, dtype=np.float64) for n, v in params.items()}
    self.m = {n: np.zeros_like(v) for n, v in self.p.items()}
    self.v = {n: np.zeros_like(v) for n, v in self.p.items()}
    self.d = {n: np.zeros_like(v) for n, v in self.p.items()}
    self.lr, self.b1, self.b2, self.eps, self.wd, self.k = lr, b1, b2, eps, wd, k
    self.block_size, self.update_freq = block_size, update_freq
    self.floor, self.clip, self.lazy_moment = floor, clip, lazy_moment
    self.curvature_clip = curvature_clip
    self.clipped_steps = 0  # steps whose curvature the curvature clip scaled down
    self.t = 0
    self.refreshes_done = 0

  def refreshes(self):
    """Whether the next step recomputes D (steps 1, 1+k, 1+2k, ...)."""
    return self.t % self.update_freq == 0

  def step(self, grads, estimate):
    lr = self.lr(self.t) if callable(self.lr) else self.lr
    refresh = self.refreshes()
    self.t += 1
    self.refreshes_done += refresh
    t = self.t
    scale = 1.0
    if refresh:
      d = {n: flax_spatial_average(np.abs(estimate[n]), self.block_size) for n in self.p}
      overall = sum(x.sum() for x in d.values()) / sum(x.size for x in d.values())
      for n, x in d.items():
        self.d[n] = np.maximum(x, self.floor * (x.mean() if x.mean() > 0 else overall))
      if self.curvature_clip is not None:
        squares = [x**2 for x in self.d.values()]
        scale = self.spike_scale(
          np.sqrt(sum(x.sum() for x in squares) / sum(x.size for x in squares))
        )
        for n in self.p:
          self.d[n] = scale * self.d[n]
    for n in self.p:
      g = scale * np.asarray(grads[n], dtype=np.float64)
      self.m[n] = self.b1 * self.m[n] + (1 - self.b1) * g
      if self.lazy_moment == "repeat":
        self.v[n] = self.b2 * self.v[n] + (1 - self.b2) * self.d[n] ** 2
        v_hat = self.v[n] / (1 - self.b2**t)
      else:
        decay = self.b2**self.update_freq
        if refresh:
          self.v[n] = decay * self.v[n] + (1 - decay) * self.d[n] ** 2
        v_hat = self.v[n] / (1 - decay**self.refreshes_done)
      u = self.m[n] / (1 - self.b1**t) / (v_hat ** (self.k / 2) + self.eps)
      if self.clip is not None:
        u = np.clip(u, -self.clip, self.clip)
      self.p[n] = self.p[n] - lr * (u + self.wd * self.p[n])
    return self.p

  def spike_scale(self, rms):
    """The curvature clip's factor for a D of root mean square ``rms`` (a refresh step, before v
    moves), counting the steps it scales down."""
    if self.lazy_moment == "repeat":
      decay, before, steps = self.b2, self.t - 1, self.t - 1
    else:  # v's steps: update_freq per refresh
      decay, before = self.b2**self.update_freq, self.refreshes_done - 1
      steps = before * self.update_freq
    if steps < 10:
      return 1.0
    v_hat = [v / (1 - decay**before) for v in self.v.values()]
    so_far = np.sqrt(sum(v.sum() for v in v_hat) / sum(v.size for v in v_hat))
    if so_far > 0 and rms > self.curvature_clip * so_far:
      self.clipped_steps += 1
      return self.curvature_clip * so_far / rms
    return 1.0
