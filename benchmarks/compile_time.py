"""Compile time of AdaHessian's training step against Adam's, as the number of leaves grows.

One command::

  python benchmarks/compile_time.py          # benchmarks/results/compile_time.json
  python benchmarks/compile_time.py --quick  # smoke run on tiny models (CI), to a temp dir

A model with many parameter leaves (a deep Flax network without ``nn.scan``, a ResNet-50 has
about 320) is compiled once per run, and XLA's compile time then comes before the first step. The
models are residual stacks of ``depth`` blocks (``LayerNorm``, ``Dense``, GELU, ``Dense``: six
leaves each) on 16 features, so that compiling, not the arithmetic, is what grows; and the
transformer LM of ``models.py``. For each model four jitted training steps, as a user writes them
(``examples/_common.make_step``), are lowered and compiled from a cleared cache:

* ``adam``: ``value_and_grad``, ``optax.adam``'s update, ``apply_updates``;
* ``adam+hvp``: the same plus one Hessian-vector product by ``jax.jvp`` over ``jax.grad`` with a
  constant tangent: the work AdaHessian's step adds, without its probes and moments;
* ``fused``: AdaHessian's one-pass route (``value_grad_and_hessian_diag``, then
  ``update(..., hessian_diag=...)``);
* ``closure``: AdaHessian's ``update(..., value_fn=...)``.

Reported per step: ``lower_s`` (tracing to StableHLO) and ``compile_s`` (XLA), medians over
``--repeats``; ``hlo``: the instructions of the optimized module (exact at any load, so a
growth that is not linear in the leaves shows without a clock); and the compile time over
Adam's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import models  # noqa: E402
from _args import comma_list, out_dir, out_file, parse_with_quick, positive_int, write_json  # noqa: E402
from _common import command_line, make_step  # noqa: E402
from step_time import machine  # noqa: E402

import adahessian_jax  # noqa: E402

STEPS = ("adam", "adam+hvp", "fused", "closure")


class DeepStack(nn.Module):
  """``depth`` residual blocks of ``LayerNorm``, ``Dense``, GELU, ``Dense`` (6 leaves each)."""

  depth: int
  width: int = 16

  @nn.compact
  def __call__(self, x):
    for _ in range(self.depth):
      h = nn.Dense(self.width)(jax.nn.gelu(nn.Dense(self.width)(nn.LayerNorm()(x))))
      x = x + h
    return nn.Dense(1)(x)


def deep_problem(depth: int, seed: int = 0) -> models.Problem:
  model = DeepStack(depth)
  kx, kp = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(kx, (32, 16))
  y = jnp.sin(x.sum(axis=1, keepdims=True))
  params = model.init(kp, x)["params"]

  def loss_fn(p, batch):
    xb, yb = batch
    return jnp.mean((model.apply({"params": p}, xb) - yb) ** 2)

  description = f"{depth} residual blocks on 16 features, batch 32"
  return models.Problem(f"deep{depth}", description, params, loss_fn, [(x, y)])


def hvp_step(loss_fn):
  """Adam's step plus one Hessian-vector product (constant tangent) added to the loss."""
  tx = optax.adam(1e-3)

  def step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    ones = jax.tree.map(jnp.ones_like, params)
    _, hz = jax.jvp(jax.grad(lambda p: loss_fn(p, batch)), (params,), (ones,))
    grads = jax.tree.map(lambda g, h: g + 0 * h, grads, hz)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return tx, step


def build(name: str, problem: models.Problem):
  if name == "adam":
    tx = optax.adam(1e-3)
    return tx, make_step(tx, problem.loss_fn)
  if name == "adam+hvp":
    return hvp_step(problem.loss_fn)
  tx = adahessian_jax.adahessian(0.01)
  return tx, make_step(tx, problem.loss_fn, route="fused" if name == "fused" else "value_fn")


def hlo_instructions(compiled) -> int:
  return sum(" = " in line for line in compiled.as_text().splitlines())


def measure(problem: models.Problem, name: str, repeats: int) -> dict:
  tx, step = build(name, problem)
  state = tx.init(problem.params)
  batch = problem.batches[0]
  lowers, compiles, hlo = [], [], 0
  for _ in range(repeats):
    jax.clear_caches()
    t = time.perf_counter()
    lowered = jax.jit(step).lower(problem.params, state, batch)
    lowers.append(time.perf_counter() - t)
    t = time.perf_counter()
    compiled = lowered.compile()
    compiles.append(time.perf_counter() - t)
    hlo = hlo_instructions(compiled)
  return {
    "lower_s": round(statistics.median(lowers), 3),
    "compile_s": round(statistics.median(compiles), 3),
    "compile_runs_s": [round(c, 3) for c in compiles],
    "hlo": hlo,
  }


def table(results: dict) -> str:
  lines = [
    "| model | leaves | step | lower s | compile s | compile / Adam | HLO instructions "
    "| HLO / Adam |",
    "|---|---:|---|---:|---:|---:|---:|---:|",
  ]
  for model, res in results.items():
    adam = res["steps"]["adam"]
    for name, r in res["steps"].items():
      lines.append(
        f"| {model} | {res['leaves']} | {name} | {r['lower_s']:.2f} | {r['compile_s']:.2f} | "
        f"{r['compile_s'] / adam['compile_s']:.2f} | {r['hlo']:,} | {r['hlo'] / adam['hlo']:.2f} |"
      )
  return "\n".join(lines) + "\n"


#: The defaults that ``--quick`` changes (a flag given explicitly keeps its value).
QUICK = dict(depths=[1, 2], transformer=False)


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  p.add_argument(
    "--depths",
    type=comma_list(positive_int),
    default=[8, 24, 48],
    help="comma-separated depths of the residual stacks",
  )
  p.add_argument(
    "--transformer",
    action=argparse.BooleanOptionalAction,
    default=True,
    help="also the transformer of models.py",
  )
  p.add_argument(
    "--repeats",
    type=positive_int,
    default=1,
    help="compiles per step, their median taken (default 1)",
  )
  p.add_argument("--quick", action="store_true", help="small problems")
  p.add_argument(
    "--out",
    type=lambda text: Path(out_file(text) if text.endswith(".json") else out_dir(text)),
    default=None,
    help="result file (*.json) or directory",
  )
  return parse_with_quick(p, QUICK, argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  problems = [deep_problem(d) for d in args.depths]
  if args.transformer:
    problems.append(models.make_transformer())
  info = machine()
  print(f"{info['cpu']}, {info['cores']} cores, jax {info['jax']}, load {info['loadavg_start']}")
  results = {}
  for problem in problems:
    leaves = len(jax.tree.leaves(problem.params))
    results[problem.name] = {"leaves": leaves, "steps": {}}
    for name in STEPS:
      r = measure(problem, name, args.repeats)
      results[problem.name]["steps"][name] = r
      print(
        f"{problem.name} ({leaves} leaves) {name}: lower {r['lower_s']:.2f} s, "
        f"compile {r['compile_s']:.2f} s, {r['hlo']:,} HLO instructions",
        flush=True,
      )
  info["loadavg_end"] = list(__import__("os").getloadavg())
  out = args.out
  if out is None:
    out = Path(tempfile.mkdtemp()) if args.quick else Path(__file__).parent / "results"
  if out.suffix != ".json":
    out = out / "compile_time.json"
  payload = {"command": command_line(argv), "machine": info, "results": results}
  write_json(out, payload)
  print(table(results))
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
