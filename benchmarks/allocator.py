"""What glibc's default malloc costs each optimizer's step on XLA:CPU, and the alternatives.

One command::

  python benchmarks/allocator.py          # transformer LM, 3 rounds -> results/allocator.json
  python benchmarks/allocator.py --quick  # tiny MLP, 1 round, nothing written (CI smoke)

XLA:CPU allocates a call's temporaries afresh; glibc maps a block over 32 MiB from the kernel at
every call and unmaps it on free, so each 4 KiB costs a page fault and a zeroed page, every call.
``examples/_common.keep_freed_memory`` (which ``step_time.py`` and ``time_to_accuracy.py`` call)
makes glibc keep freed blocks instead. A setting lasts for the process, so this script runs one
fresh process per setting in each round, the order rotated from round to round, and in each
times Adam's and AdaHessian's fused k = 1 step round-robin with ``step_time.run_group`` (medians
after warm-up, page faults per step counted with ``getrusage``, exact at any load). Settings:

* ``default``: glibc as it is;
* ``keep``: ``keep_freed_memory()``, what the benchmarks use;
* ``single-arena``: ``keep`` plus ``M_ARENA_MAX=1`` (every thread allocates from the main arena,
  which, unlike a thread's arena, also keeps blocks over 64 MiB);
* ``calling-thread``: ``keep`` plus ``jax_cpu_enable_async_dispatch`` off (programs run on the
  calling thread, whose arena is the main one).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "examples")]

from _args import comma_list, parse_with_quick, positive_int, write_json  # noqa: E402  (examples/_args.py: no JAX import)

SETTINGS = ("default", "keep", "single-arena", "calling-thread")


def apply(setting: str) -> str:
  """Applies an allocator setting to this process; returns its description."""
  from _common import glibc_mallopt, keep_freed_memory

  if setting == "default":
    return "default"
  allocator = keep_freed_memory()
  if setting == "single-arena":
    m_arena_max = -8  # <malloc.h>
    mallopt = glibc_mallopt()
    if mallopt is None or mallopt(m_arena_max, 1) != 1:
      raise RuntimeError("mallopt(M_ARENA_MAX, 1) refused")
    allocator += ", M_ARENA_MAX=1"
  elif setting == "calling-thread":
    import jax

    jax.config.update("jax_cpu_enable_async_dispatch", False)
    allocator += ", jax_cpu_enable_async_dispatch off"
  elif setting != "keep":
    raise ValueError(f"unknown allocator setting {setting!r}; choose from {SETTINGS}")
  return allocator


def measure(model: str, setting: str, size: str, steps: int) -> dict:
  """Runs in the child process: times Adam and the fused step under one allocator setting."""
  allocator = apply(setting)
  import models
  from step_time import Config, run_group

  rows = run_group(
    models.MODELS[model](size), [Config("adam"), Config("fused")], steps, 5, {}, lambda s: None
  )
  out = {"allocator": allocator}
  for name, row in zip(("adam", "adahessian"), rows, strict=True):
    out[name] = {
      key: row[key] for key in ("ms_per_step_median", "ms_per_step_iqr", "page_faults_per_step")
    }
    out[name]["temp_mib"] = row["memory_analysis"]["temp_bytes"] / 2**20
  out["time_ratio_adam"] = rows[1]["time_ratio_adam"]
  return out


#: The defaults that ``--quick`` changes (a flag given explicitly keeps its value).
QUICK = dict(model="mlp", rounds=1, steps=6)


def parse_args(argv=None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--quick", action="store_true", help="tiny models, nothing written")
  ap.add_argument("--model", default="transformer", help="a model of models.py")
  ap.add_argument(
    "--rounds", type=positive_int, default=3, help="processes per setting (default 3)"
  )
  ap.add_argument(
    "--settings",
    type=comma_list(SETTINGS),
    default=list(SETTINGS),
    help=f"comma-separated subset of {','.join(SETTINGS)}",
  )
  ap.add_argument(
    "--steps", type=positive_int, default=80, help="timed steps per optimizer and process"
  )
  ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
  return ap, parse_with_quick(ap, QUICK, argv)


def main(argv=None) -> int:
  ap, args = parse_args(argv)
  size = "tiny" if args.quick else "full"
  model = args.model
  if args.child:
    print(json.dumps(measure(model, args.child, size, args.steps)))
    return 0
  import models  # here, not at the top: a child sets up malloc before it imports JAX

  if model not in models.MODELS:
    ap.error(f"--model {model!r}: choose from {', '.join(models.MODELS)}")
  load = os.getloadavg()
  print(f"load average {load}")
  settings = args.settings
  runs = []
  for p in range(args.rounds):
    for mode in settings[p % len(settings) :] + settings[: p % len(settings)]:
      cmd = [sys.executable, __file__, "--model", model, "--steps", str(args.steps)]
      cmd += ["--child", mode] + (["--quick"] if args.quick else [])
      proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
      res = json.loads(proc.stdout.strip().splitlines()[-1])
      res["mode"] = mode
      runs.append(res)
      a, h = res["adam"], res["adahessian"]
      print(
        f"{mode:14s} Adam {a['ms_per_step_median']:6.2f} ms ({a['page_faults_per_step']:6.0f} "
        f"faults/step)  AdaHessian {h['ms_per_step_median']:6.2f} ms "
        f"({h['page_faults_per_step']:6.0f} faults/step)  ratio {res['time_ratio_adam']:.2f}"
      )
  if args.quick:
    return 0
  from _common import command_line

  payload = {
    "command": command_line(argv),
    "model": model,
    "loadavg_start": load,
    "loadavg_end": os.getloadavg(),
    "runs": runs,
  }
  print(f"wrote {write_json(HERE / 'results' / 'allocator.json', payload)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
