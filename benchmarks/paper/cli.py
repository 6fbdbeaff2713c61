"""The paper-claim experiments' shared command line, output files and ending of ``main``.

Every experiment script calls :func:`main` with its name, a ``run(args, out)`` that trains and
fills ``out`` (returning the markdown table) and a ``plot(out, plt)`` that returns a figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import optax

import adahessian_jax

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "examples"))

from _args import json_object, out_dir, parse_with_quick, positive_int  # noqa: E402  (examples/_args.py)

#: Where ``--quick`` writes without ``--out``: never over the committed results and figures.
QUICK_DIR = os.path.join(tempfile.gettempdir(), "adahessian_jax_paper_quick")
SEEDS, QUICK_SEEDS = 4, 2  # 4 seeds: the same vmapped shape as the 4-value LR sweep
EXACT, CONFIGURED = "adahessian", "adahessian_config"  # result keys of the AdaHessian rows
CONFIG_COLORS = ("tab:purple", "tab:orange", "tab:brown", "tab:olive", "tab:pink")


def enable_compilation_cache() -> None:
  """Persists compiled programs across the experiment commands (they share many programs)."""
  path = os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(
    os.path.expanduser("~"), ".cache", "adahessian_jax_paper_xla"
  )
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


#: ``adahessian()`` arguments that the experiments set for every row themselves: a config's value
#: replaced theirs silently (``{"update_freq": 2}`` trained every column of Table 6 at 2) or
#: clashed with them only when the AdaHessian rows came.
SET_BY_EXPERIMENT = ("learning_rate", "block_size", "update_freq", "averaging")


def check_adahessian_config(p: argparse.ArgumentParser, config: dict[str, Any]) -> None:
  """Refuses, as a usage error, an ``--adahessian-config`` that ``adahessian()`` does not take,
  or that sets an argument in :data:`SET_BY_EXPERIMENT`.

  Checked before anything trains: otherwise an unknown name or a bad value failed only when the
  AdaHessian rows came, after the other optimizers (and their sweeps) had run.

  Args:
    p: The parser (its ``error`` exits with status 2).
    config: The keyword arguments given.
  """
  if taken := [name for name in SET_BY_EXPERIMENT if name in config]:
    p.error(
      f"argument --adahessian-config: {json.dumps(config)}: {', '.join(taken)} "
      "set by the experiment for every row (the tuned learning rate, the block sizes and "
      "refresh intervals it compares, the task's averaging); give the other arguments"
    )
  try:
    adahessian_jax.adahessian(0.1, **config)
  except (TypeError, ValueError) as e:
    p.error(f"argument --adahessian-config: {json.dumps(config)}: {e}")


def parse_args(
  description: str,
  argv: Sequence[str] | None = None,
  add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
  quick: Mapping[str, Any] | None = None,
) -> argparse.Namespace:
  """Parses an experiment's command line.

  Args:
    description: The command's help text.
    argv: The arguments (default ``sys.argv[1:]``).
    add_arguments: Adds the experiment's own options to the parser.
    quick: The defaults of the experiment's own options that ``--quick`` changes (a flag given
      explicitly keeps its value).
  """
  p = argparse.ArgumentParser(description=description)
  if add_arguments is not None:
    add_arguments(p)
  p.add_argument("--quick", action="store_true", help="tiny smoke run (seconds)")
  p.add_argument(
    "--out",
    type=out_dir,
    default=None,
    help=f"results directory (default: results/; --quick: {QUICK_DIR})",
  )
  p.add_argument(
    "--figures",
    type=out_dir,
    default=None,
    help="figures directory (default: figures/, or --out if given)",
  )
  p.add_argument(
    "--seeds",
    type=positive_int,
    default=None,
    help=f"evaluation seeds 0..N-1 per configuration (default {SEEDS}; --quick: {QUICK_SEEDS})",
  )
  p.add_argument(
    "--adahessian-config",
    dest="adahessian_configs",
    type=json_object,
    action="append",
    default=[],
    metavar="JSON",
    help="extra adahessian_jax.adahessian arguments, e.g. '{\"curvature_floor\": 0.1}': "
    "AdaHessian is then also trained with them, beside the exact rule, at the exact rule's "
    "tuned learning rate (not the arguments the experiment sets: "
    f"{', '.join(SET_BY_EXPERIMENT)}); repeat for more rows",
  )
  args = parse_with_quick(p, quick or {}, argv)
  for config in args.adahessian_configs:
    check_adahessian_config(p, config)
  enable_compilation_cache()
  explicit_out = args.out is not None
  if args.out is None:
    args.out = QUICK_DIR if args.quick else os.path.join(HERE, "results")
  if args.figures is None:
    args.figures = args.out if explicit_out or args.quick else os.path.join(HERE, "figures")
  os.makedirs(args.out, exist_ok=True)
  os.makedirs(args.figures, exist_ok=True)
  args.seeds = tuple(range(args.seeds or (QUICK_SEEDS if args.quick else SEEDS)))
  return args


def config_keys(args) -> dict[str, dict[str, Any]]:
  """The result key of each ``--adahessian-config``: ``CONFIGURED``, then ``CONFIGURED2``, ..."""
  return {
    CONFIGURED if i == 0 else f"{CONFIGURED}{i + 1}": config
    for i, config in enumerate(args.adahessian_configs)
  }


def variants(opts: Sequence[str], args) -> Iterator[tuple[str, str, dict[str, Any]]]:
  """``(result key, optimizer name, AdaHessian config)`` of every row to train.

  AdaHessian gets one more row per ``--adahessian-config`` (keys from :func:`config_keys`).
  """
  for opt in opts:
    yield opt, opt, {}
    if opt == EXACT:
      for key, config in config_keys(args).items():
        yield key, EXACT, config


def results_field(key: str) -> str:
  """Where a list-shaped experiment keeps a row's results: the exact rule's stay in "results"."""
  return "results" if key == EXACT else "results_" + key.replace(CONFIGURED, "configured")


def color(key: str) -> str:
  """A row's plot color: the exact rule red, the configured rows from ``CONFIG_COLORS``."""
  if key == EXACT:
    return "tab:red"
  index = int(key.removeprefix(CONFIGURED) or 1) - 1
  return CONFIG_COLORS[index % len(CONFIG_COLORS)]


def label(key: str, config: dict[str, Any] | None = None) -> str:
  """A row's name in tables and legends: ``adahessian (curvature_floor=0.1)`` for the second."""
  if not key.startswith(CONFIGURED):
    return key
  return f"{EXACT} (" + ", ".join(f"{k}={v}" for k, v in sorted((config or {}).items())) + ")"


def environment() -> dict[str, Any]:
  return {
    "jax": jax.__version__,
    "optax": optax.__version__,
    "backend": jax.default_backend(),
    "devices": [str(d) for d in jax.devices()],
    "cpu_count": os.cpu_count(),
    "python": platform.python_version(),
    "load_average_at_start": list(os.getloadavg()),
  }


def write_json(out_dir: str, name: str, payload: dict[str, Any]) -> str:
  path = os.path.join(out_dir, f"{name}.json")
  with open(path, "w") as f:
    json.dump(finite(payload), f, indent=1, allow_nan=False, default=json_default)
  return path


def finite(x):
  """Replaces non-finite floats (diverged runs) by ``None`` so the JSON is standard."""
  if isinstance(x, dict):
    return {k: finite(v) for k, v in x.items()}
  if isinstance(x, list | tuple):
    return [finite(v) for v in x]
  if isinstance(x, float | np.floating) and not np.isfinite(x):
    return None
  return x


def json_default(x):
  """``json.dump``'s ``default``: NumPy scalars and arrays as Python numbers and lists."""
  if isinstance(x, np.generic | np.ndarray):
    return x.tolist()
  raise TypeError(f"not JSON serialisable: {type(x)}")


def pyplot():
  """matplotlib.pyplot with the Agg backend, or ``None`` when matplotlib is not installed."""
  try:
    import matplotlib
  except ImportError:
    return None
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def mean_std(rows: Sequence[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
  """The summaries' means and stds as arrays, NaN where every seed diverged."""
  pick = lambda key: np.array(
    [np.nan if r["summary"][key] is None else r["summary"][key] for r in rows], float
  )
  return pick("mean"), pick("std")


def main(
  experiment: str,
  description: str,
  run: Callable[[argparse.Namespace, dict[str, Any]], str],
  plot: Callable[[dict[str, Any], Any], Any],
  paper: dict[str, Any],
  add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
  quick: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
  """Parses the command line, runs the experiment, writes its JSON and figure.

  Args:
    experiment: The name of the JSON (``<out>/<experiment>.json``) and figure files.
    description: The command's help text.
    run: ``run(args, out)`` trains, puts its results into ``out`` and returns the markdown table.
    plot: ``plot(out, plt)`` returns the matplotlib figure (not called without matplotlib).
    paper: The paper's numbers the experiment compares with.
    add_arguments: Adds the experiment's own options to the parser.
    quick: The defaults of those options that ``--quick`` changes.

  Returns:
    The payload written to the JSON.
  """
  args = parse_args(description, add_arguments=add_arguments, quick=quick)
  t_start = time.perf_counter()
  out = {"experiment": experiment, "quick": args.quick, "seeds": list(args.seeds)}
  out["adahessian_configs"] = config_keys(args)
  out["table_markdown"] = run(args, out)
  out["paper"] = paper
  out["environment"] = environment()
  out["wall_s"] = round(time.perf_counter() - t_start, 1)
  print(out["table_markdown"])
  print(f"wrote {write_json(args.out, experiment, out)}")
  plt = pyplot()
  if plt is not None:
    fig = plot(out, plt)
    if not fig.legends:  # a figure-level legend comes with its own layout
      fig.tight_layout()
    figure = os.path.join(args.figures, f"{experiment}.png")
    fig.savefig(figure, dpi=90)
    plt.close(fig)
    print(f"wrote {figure}")
  return out
