#!/usr/bin/env bash
# Minimum-versions lane: installs exactly the lower bounds that pyproject.toml declares (read by
# .ci/floors.py, so they cannot drift apart) and runs an explicit subset of the tests on them.
#
# Two environments, because the [flax] extra's floors cannot be installed with the core's:
# flax 0.12.7 (the first with nnx.as_pure) requires jax 0.10.0, which requires numpy 2, while the
# core works on jax 0.7.0 and numpy 1.26.
#   core: the requires-python floor (when this machine has that Python; otherwise python3),
#         jax == jaxlib, optax, numpy and the [plot] extra's matplotlib at their floors; no flax.
#   flax: the [flax] extra's floors (flax, orbax-checkpoint, jax == jaxlib) with the core's optax
#         floor; numpy is left to pip.
# Each runs an explicit subset chosen to touch every module once in ~20 s of CPU: the NumPy
# reference trajectories, the fused route, spatial averaging, Hutchinson, Lanczos, the Hessian
# operator's refusals (jax 0.7.0 ravels a tree without leaves to a scalar) and the plots on the
# core floors; the Linen and NNX helpers on the [flax] floors. Left out everywhere: tests
# that need jax APIs newer than the core floor (jax.extend.core.jaxprs_in_params,
# jax.monitoring's listener removal, optax.MultiSteps(accumulator_dtype=)) and the slow
# multi-device subprocess tests.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# The tests import this checkout (the current folder is on sys.path), also in their subprocesses.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

. .ci/python.sh  # find_python

# make_env DIR PYTHON PINS...: a fresh virtual environment with exactly PINS and pytest (not
# byte-compiled: it lives for one run, and compiling all of jax and scipy costs more than it saves).
# The environment gets no pip of its own (installing one costs ~5 s of CPU): python3's pip
# installs into it (pip >= 22.3, --python).
make_env() {
  local dir=$1 python=$2
  shift 2
  "$python" -m venv --without-pip "$dir"
  python3 -m pip --python "$dir/bin/python" install --quiet --no-compile "$@" pytest
  python3 -m pip --python "$dir/bin/python" check
  echo "installed: $("$dir/bin/python" --version 2>&1), $*"
}

python_floor=$(python3 .ci/floors.py --python)
core_python=$(find_python "$python_floor")
if [ -z "$core_python" ]; then
  echo "Python $python_floor is not on this machine; the core floors run on $(python3 --version)"
  core_python=python3
fi

echo "== minimum versions, core"
# shellcheck disable=SC2046  # the pins are words
make_env "$work/core" "$core_python" $(python3 .ci/floors.py plot)
"$work/core/bin/python" -m pytest -q -p no:cacheprovider \
  tests/test_transform.py::test_trajectory_matches_numpy_reference \
  tests/test_transform.py::test_schedule_and_inject_hyperparams_match_reference \
  tests/test_transform.py::test_inside_chain_with_extra_args \
  tests/test_transform.py::test_lazy_hessian_runs_hvp_only_on_refresh_steps \
  tests/test_fused.py::test_fused_matches_closure_outside_jit \
  tests/test_fused.py::test_fused_step_on_a_non_refresh_step_costs_one_value_and_grad \
  tests/test_spatial.py tests/test_hutchinson.py \
  tests/test_hessian_eigen.py::test_top_eigenvalues_match_dense_to_1e8 \
  tests/test_hessian_checks.py::test_params_that_are_not_finite_or_empty_are_refused_at_once \
  tests/test_hessian_landscape.py::test_plots \
  -k "not cnn"  # the Flax-CNN cases of the reference trajectories need flax

echo "== minimum versions, [flax] extra"
# numpy is left to pip: the core's numpy floor is below what jax's [flax] floor requires.
# shellcheck disable=SC2046
make_env "$work/flax" python3 $(python3 .ci/floors.py flax --skip numpy)
"$work/flax/bin/python" -m pytest -q -p no:cacheprovider \
  tests/test_linen.py::test_flax_train_state_cannot_forward_but_ours_can \
  tests/test_nnx.py::test_value_fn_route_and_fused_route_agree_and_train \
  tests/test_nnx.py::test_has_aux
