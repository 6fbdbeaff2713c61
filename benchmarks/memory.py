"""Peak memory of the compiled training step at ~100M parameters: AdamW vs AdaHessian.

The model is the pods-style transformer of ``examples/pods_transformer.py`` (``nn.scan`` over
blocks, logical axis names, bfloat16 compute, float32 parameters and moments), by default 14
layers of width 768 (12 heads, MLP 3072), context 512, batch 8: 99.8M parameters. For each
optimizer, with and without ``nn.remat`` of the blocks, the training step a pods user writes
(AdaHessian: the fused route ``value_grad_and_hessian_diag`` then ``tx.update``; AdamW:
``value_and_grad`` then ``tx.update``; parameters and optimizer state donated) is lowered from
``jax.ShapeDtypeStruct``s and compiled, never run: nothing of model size is allocated, and the
bytes are exact whatever the machine's load.

From ``compiled.memory_analysis()``:

* ``argument``, ``output``: bytes of the step's inputs (params, state, batch) and outputs;
* ``alias``: output bytes written into donated inputs (params and state are updated in place);
* ``temp``: XLA's temporary buffers (activations, gradients, Hessian-vector products, ...);
* ``peak`` = argument + output - alias + temp, the step's footprint.

Optimizers: AdamW (betas (0.9, 0.98)), AdaHessian refreshing the Hessian every step (k=1) and
lazily (``update_freq=4``: the step contains a ``lax.cond``; XLA's buffer assignment covers the
costlier branch). The check the table ends with: AdaHessian k=1's peak within AdamW's plus one
parameter-sized float32 buffer. To say what the difference is made of, the gradient part of the
step is also compiled alone three ways: ``value_and_grad`` (AdamW's), ``value_grad_hvp`` with the
probe given as an input (the forward-over-reverse pass alone) and the fused
``value_grad_and_hessian_diag`` (which also draws the probe).

Usage::

  python benchmarks/memory.py           # 12 compilations of the ~100M model, a few minutes
  python benchmarks/memory.py --quick   # a 0.8M-parameter model, about a minute (65 s idle)
  python benchmarks/memory.py --layers 12 --width 1024 --context 1024   # another size

Writes ``benchmarks/results/memory.json`` (``--out`` to change; ``--quick`` does not write unless
``--out`` is given).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "examples"))

import _common  # noqa: E402
import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from _args import check_heads, out_dir, parse_with_quick, positive_int, write_json  # noqa: E402
from pods_transformer import CharLM, adahessian_config, cross_entropy  # noqa: E402

import adahessian_jax  # noqa: E402

VOCAB = 103  # characters of pydoc_data.topics, as in the example; no data is read
MiB = 2**20


def optimizers(block):
  """name -> (transform, uses the Hessian). Learning rates do not change memory."""
  config = adahessian_config(block)
  return {
    "AdamW": (optax.adamw(1e-3, b1=0.9, b2=0.98, weight_decay=1e-4), False),
    "AdaHessian k=1": (adahessian_jax.adahessian(0.15, **config), True),
    "AdaHessian k=4 (lazy)": (adahessian_jax.adahessian(0.15, update_freq=4, **config), True),
  }


def make_step(model, tx, hessian):
  loss_fn = lambda params, batch: cross_entropy(model, params, batch)
  step = _common.make_step(tx, loss_fn, "fused" if hessian else "plain")
  return jax.jit(step, donate_argnums=(0, 1))


def measure(model, tx, hessian, params, batch):
  """Compiles one step from shapes only; returns memory_analysis's bytes and the peak."""
  state = jax.eval_shape(tx.init, params)
  t0 = time.perf_counter()
  compiled = make_step(model, tx, hessian).lower(params, state, batch).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  row = {
    "argument_bytes": int(mem.argument_size_in_bytes),
    "output_bytes": int(mem.output_size_in_bytes),
    "alias_bytes": int(mem.alias_size_in_bytes),
    "temp_bytes": int(mem.temp_size_in_bytes),
    "state_bytes": _common.tree_bytes(state),
    "compile_s": round(compile_s, 1),
  }
  row["peak_bytes"] = (
    row["argument_bytes"] + row["output_bytes"] - row["alias_bytes"] + row["temp_bytes"]
  )
  return row


def attribution_of(model, params, batch):
  """Temp bytes of the step's gradient part alone, to say what AdaHessian's extra memory is.

  ``value_and_grad`` (AdamW's pass), ``value_grad_hvp`` with the probe ``z`` given as an input
  (the forward-over-reverse pass alone) and the fused ``value_grad_and_hessian_diag`` (which also
  draws ``z`` and returns ``z * Hz``).
  """
  loss_fn = lambda p, b: cross_entropy(model, p, b)
  hvp = adahessian_jax.hutchinson.value_grad_hvp
  state = jax.eval_shape(adahessian_jax.adahessian(0.1).init, params)
  parts = {
    "value_and_grad": (jax.value_and_grad(loss_fn), (params, batch)),
    "value_grad_hvp, probe given": (
      lambda p, z, b: hvp(lambda q: loss_fn(q, b), p, z),
      (params, params, batch),
    ),
    "fused value_grad_and_hessian_diag": (
      adahessian_jax.value_grad_and_hessian_diag(loss_fn),
      (params, state, batch),
    ),
  }
  out = {}
  for name, (fn, args) in parts.items():
    mem = jax.jit(fn).lower(*args).compile().memory_analysis()
    out[name] = {
      "temp_bytes": int(mem.temp_size_in_bytes),
      "output_bytes": int(mem.output_size_in_bytes),
    }
  return out


def print_table(result):
  param_bytes = result["param_bytes"]
  print(
    f"\n{result['parameters']:,} parameters ({param_bytes / MiB:,.1f} MiB float32), batch "
    f"{result['batch']} x context {result['context']}; MiB, peak = argument + output - alias "
    f"+ temp"
  )
  header = (
    f"{'optimizer':<22} {'remat':>5} {'argument':>9} {'output':>9} {'alias':>9} {'temp':>9} "
    f"{'peak':>9} {'peak - AdamW':>12} {'in params':>9}"
  )
  print(header + "\n" + "-" * len(header))
  for r in result["rows"]:
    base = next(
      b["peak_bytes"]
      for b in result["rows"]
      if b["optimizer"] == "AdamW" and b["remat"] == r["remat"]
    )
    extra = r["peak_bytes"] - base
    print(
      f"{r['optimizer']:<22} {'yes' if r['remat'] else 'no':>5} "
      + " ".join(f"{r[k] / MiB:>9,.1f}" for k in ("argument_bytes", "output_bytes", "alias_bytes"))
      + f" {r['temp_bytes'] / MiB:>9,.1f} {r['peak_bytes'] / MiB:>9,.1f} "
      f"{extra / MiB:>+12,.1f} {extra / param_bytes:>+9.2f}"
    )
  for key, parts in result["attribution"].items():
    print(f"{key.replace('_', ' ')}: temp bytes of the gradient part alone")
    base = parts["value_and_grad"]["temp_bytes"]
    for name, m in parts.items():
      extra = m["temp_bytes"] - base
      print(
        f"  {name:<36} {m['temp_bytes'] / MiB:>9,.1f} MiB ({extra / MiB:>+9,.1f} MiB = "
        f"{extra / param_bytes:+.2f} parameter buffers)"
      )
  for c in result["checks"]:
    verdict = "within" if c["within"] else "NOT within"
    print(
      f"check (remat {'yes' if c['remat'] else 'no'}): AdaHessian k=1 peak - AdamW peak = "
      f"{c['extra_bytes'] / MiB:,.1f} MiB = {c['extra_in_params']:.2f} parameter buffers: "
      f"{verdict} AdamW + 1 parameter buffer"
    )


#: The defaults that ``--quick`` changes (a flag given explicitly keeps its value).
QUICK = dict(layers=4, width=128, heads=4, context=64, batch_size=8)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--layers", type=positive_int, default=14)
  p.add_argument("--width", type=positive_int, default=768)
  p.add_argument("--heads", type=positive_int, default=12, help="a divisor of --width")
  p.add_argument("--context", type=positive_int, default=512)
  p.add_argument("--batch-size", type=positive_int, default=8)
  p.add_argument(
    "--block-size", type=positive_int, default=32, help="AdaHessian's averaging block (default 32)"
  )
  p.add_argument("--quick", action="store_true", help="a 0.8M-parameter model (smoke test)")
  p.add_argument(
    "--out",
    type=out_dir,
    default=None,
    help="directory of memory.json (default benchmarks/results; --quick: none, nothing written)",
  )
  args = parse_with_quick(p, QUICK, argv)
  check_heads(p, args)
  return args


def main():
  args = parse_args()
  out = args.out or (None if args.quick else os.path.join(HERE, "results"))

  tokens = jax.ShapeDtypeStruct((args.batch_size, args.context), jnp.int32)
  batch = jax.ShapeDtypeStruct((args.batch_size, args.context + 1), jnp.int32)
  rows, attribution = [], {}
  for remat in (True, False):
    model = CharLM(
      VOCAB, args.context, args.width, args.layers, args.heads, 4 * args.width, remat=remat
    )
    params = jax.eval_shape(model.init, jax.random.key(0), tokens)["params"]
    param_bytes = _common.tree_bytes(nn.unbox(params))
    for name, (tx, hessian) in optimizers(args.block_size).items():
      row = {"optimizer": name, "remat": remat, **measure(model, tx, hessian, params, batch)}
      rows.append(row)
      print(f"compiled {name}, remat {remat}: peak {row['peak_bytes'] / MiB:,.1f} MiB", flush=True)
    attribution["remat" if remat else "no_remat"] = attribution_of(model, params, batch)

  checks = []
  for remat in (True, False):
    adam = next(r for r in rows if r["optimizer"] == "AdamW" and r["remat"] == remat)
    ada = next(r for r in rows if r["optimizer"] == "AdaHessian k=1" and r["remat"] == remat)
    extra = ada["peak_bytes"] - adam["peak_bytes"]
    checks.append(
      {
        "remat": remat,
        "extra_bytes": extra,
        "extra_in_params": extra / param_bytes,
        "within": extra <= param_bytes,
      }
    )
  result = {
    "command": _common.command_line(),
    "parameters": int(sum(np.prod(x.shape) for x in jax.tree.leaves(nn.unbox(params)))),
    "param_bytes": param_bytes,
    "layers": args.layers,
    "width": args.width,
    "heads": args.heads,
    "mlp": 4 * args.width,
    "context": args.context,
    "batch": args.batch_size,
    "vocab": VOCAB,
    "compute_dtype": "bfloat16",
    "param_dtype": "float32",
    "backend": jax.default_backend(),
    "jax": jax.__version__,
    "machine": platform.machine(),
    "rows": rows,
    "attribution": attribution,
    "checks": checks,
  }
  print_table(result)
  if out:
    print(f"wrote {write_json(os.path.join(out, 'memory.json'), result)}")


if __name__ == "__main__":
  main()
