"""The command lines of the examples and benchmarks: where a quick run writes, bad flags."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER = os.path.join(ROOT, "benchmarks", "paper")
STABILITY = os.path.join(ROOT, "benchmarks", "stability")


def _script(directory: str, name: str):
  """The module ``name`` of a scripts folder (imported with that folder on ``sys.path``)."""
  sys.path.insert(0, directory)
  try:
    return importlib.import_module(name)
  finally:
    sys.path.remove(directory)


@pytest.fixture(scope="module")
def paper_cli():
  return _script(PAPER, "cli")


def test_paper_quick_run_does_not_write_over_the_committed_results(paper_cli, tmp_path):
  args = paper_cli.parse_args("test", ["--quick"])
  for d in (args.out, args.figures):
    assert not os.path.abspath(d).startswith(os.path.join(PAPER, "")), d
  args = paper_cli.parse_args("test", ["--quick", "--out", str(tmp_path)])
  assert (args.out, args.figures) == (str(tmp_path), str(tmp_path))


@pytest.fixture(scope="module")
def examples_path():
  examples = os.path.join(ROOT, "examples")
  sys.path.insert(0, examples)
  yield
  sys.path.remove(examples)


@pytest.mark.parametrize(
  "kind, flag, value, message",
  [
    ("positive_int", "--steps", "0", "must be a positive integer, got '0'"),
    ("positive_int", "--steps", "2.5", "must be a positive integer, got '2.5'"),
    ("nonnegative_int", "--seed", "-1", "must be a non-negative integer, got '-1'"),
    ("positive_float", "--lr", "nan", "must be a positive number, got 'nan'"),
    ("positive_float", "--lr", "-0.1", "must be a positive number, got '-0.1'"),
    ("nonnegative_float", "--floor", "inf", "must be a non-negative number, got 'inf'"),
    ("json_object", "--config", "[1]", "expected a JSON object of keyword arguments, got '[1]'"),
  ],
)
def test_bad_values_are_usage_errors_naming_the_flag(
  examples_path, capsys, kind, flag, value, message
):
  import _args

  p = argparse.ArgumentParser()
  p.add_argument(flag, type=getattr(_args, kind))
  with pytest.raises(SystemExit) as e:
    p.parse_args([flag, value])
  assert e.value.code == 2
  assert f"argument {flag}: {message}" in capsys.readouterr().err


def test_good_values_parse(examples_path):
  import _args

  assert _args.positive_int("3") == 3 and _args.nonnegative_int("0") == 0
  assert _args.positive_float("1e-3") == 1e-3 and _args.nonnegative_float("0") == 0.0
  assert _args.json_object('{"update_clip": 0.05}') == {"update_clip": 0.05}
  assert _args.comma_list(("a", "b"))(" b,a ") == ["b", "a"]
  assert _args.comma_list(_args.positive_int)("1,2") == [1, 2]
  for text in ("a,c", ","):
    with pytest.raises(argparse.ArgumentTypeError):
      _args.comma_list(("a", "b"))(text)


def test_names_are_checked_when_parsed(examples_path):
  import _args

  names = ("AdaHessian", "AdamW")
  assert _args.one_of(names, ignore_case=True)("adamw") == "AdamW"
  assert _args.name_value(names, _args.positive_float, True)("adahessian=0.3") == (
    "AdaHessian",
    0.3,
  )
  assert _args.comma_list(names, ignore_case=True)("adamw, ADAHESSIAN") == ["AdamW", "AdaHessian"]
  for parse, bad, message in [
    (_args.one_of(names), "adamw", "unknown 'adamw'; choose from AdaHessian, AdamW"),
    (
      _args.comma_list(names),
      "AdamW,Adam,x",
      "unknown ['Adam', 'x']; choose from AdaHessian, AdamW",
    ),
    (_args.comma_list(names), ",", "expected a comma-separated list of AdaHessian, AdamW, got ','"),
    (
      _args.comma_list(names, ignore_case=True),
      "adamw,AdaHessian,AdamW",
      "AdamW given more than once in 'adamw,AdaHessian,AdamW'",
    ),
    (
      _args.name_value(names, _args.positive_float),
      "AdaHessian",
      "expected NAME=VALUE with NAME one of AdaHessian, AdamW, got 'AdaHessian'",
    ),
    (
      _args.name_value(names, _args.positive_float),
      "Adam=0.1",
      "'Adam=0.1': unknown 'Adam'; choose from AdaHessian, AdamW",
    ),
    (
      _args.name_value(names, _args.positive_float),
      "AdamW=-0.1",
      "'AdamW=-0.1': must be a positive number, got '-0.1'",
    ),
  ]:
    with pytest.raises(argparse.ArgumentTypeError) as e:
      parse(bad)
    assert str(e.value) == message


@pytest.mark.parametrize(
  "script, names",
  [
    ("cv_digits", "AdaHessian, Adam, SGD+momentum"),
    ("nlp_charlm", "AdaHessian, AdamW"),
    ("recsys_dlrm", "AdaHessian, Adagrad"),
    ("pods_transformer", "AdaHessian, AdamW"),
  ],
)
def test_examples_check_lr_and_only_when_parsed(examples_path, capsys, script, names):
  # A wrong name or rate (`--only adahesian`, `--lr foo=0.1`, `--lr adam=x`) exited 1 without a
  # usage line, and only once the data was loaded and the model built.
  pytest.importorskip("flax")
  pytest.importorskip("sklearn")
  parse = importlib.import_module(script).parse_args
  args = parse(["--lr", "ADAHESSIAN=0.3", "--only", "adahessian"])
  assert (args.lr, args.only) == ([("AdaHessian", 0.3)], ["AdaHessian"])
  assert (parse([]).lr, parse([]).only) == ([], None)
  for argv, message in [
    (["--only", "adahesian"], f"--only: unknown ['adahesian']; choose from {names}"),
    (["--only", ","], f"--only: expected a comma-separated list of {names}, got ','"),
    (["--lr", "foo=0.1"], f"--lr: 'foo=0.1': unknown 'foo'; choose from {names}"),
    (["--lr", "adahessian=x"], "--lr: 'adahessian=x': must be a positive number, got 'x'"),
    (
      ["--lr", "adahessian"],
      f"--lr: expected NAME=VALUE with NAME one of {names}, got 'adahessian'",
    ),
    # A name given twice kept its last rate, and a rate --only leaves out was dropped, silently.
    (["--lr", "adahessian=0.1", "--lr", "AdaHessian=0.2"], "--lr: AdaHessian is given twice"),
    (
      ["--lr", f"{names.split(', ')[1]}=0.1", "--only", "adahessian"],
      f"--lr: {names.split(', ')[1]} is not among --only AdaHessian, so its rate would not be used",
    ),
  ]:
    with pytest.raises(SystemExit) as e:
      parse(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("usage: ") and f"argument {message}" in err


def test_cv_digits_batch_size_beyond_the_training_images_is_a_usage_error(examples_path, capsys):
  # --batch-size 2000 exited 1 with a ValueError once the model was built, not with a usage line.
  pytest.importorskip("flax")
  pytest.importorskip("sklearn")
  import cv_digits

  assert cv_digits.parse_args(["--batch-size", "1347"]).batch_size == 1347  # 1797 - ceil(449.25)
  with pytest.raises(SystemExit) as e:
    cv_digits.parse_args(["--batch-size", "1348"])
  err = capsys.readouterr().err
  assert e.value.code == 2 and err.startswith("usage: ")
  assert "argument --batch-size: 1348 exceeds the 1347 training images" in err


def test_heads_that_do_not_divide_the_width_are_usage_errors(examples_path, capsys):
  # nlp_charlm.py --heads 5 failed with flax's ValueError traceback once the text was loaded and
  # the model initialised; pods_transformer.py and benchmarks/memory.py built attention with
  # width // heads features per head: fewer than the width in all, none for more heads than the
  # width (the attention then added only its output bias).
  pytest.importorskip("flax")
  import nlp_charlm
  import pods_transformer

  memory = _script(os.path.join(ROOT, "benchmarks"), "memory")
  for parse, argv, width in [
    (nlp_charlm.parse_args, ["--heads", "5"], 64),
    (nlp_charlm.parse_args, ["--quick", "--heads", "3"], 32),
    (pods_transformer.parse_args, ["--heads", "256"], 128),
    (memory.parse_args, ["--quick", "--heads", "5"], 128),
  ]:
    with pytest.raises(SystemExit) as e:
      parse(argv)
    assert e.value.code == 2
    heads = argv[-1]
    assert f"argument --heads: must divide --width {width}, got {heads}" in capsys.readouterr().err
  assert nlp_charlm.parse_args(["--heads", "8"]).heads == 8
  assert pods_transformer.parse_args(["--heads", "128"]).heads == 128
  assert memory.parse_args(["--heads", "6"]).heads == 6


def test_pods_has_no_tune_flag(examples_path, capsys):
  # `pods_transformer.py --tune` was accepted and ignored: it has no learning-rate grids to sweep.
  pytest.importorskip("flax")
  import pods_transformer

  with pytest.raises(SystemExit) as e:
    pods_transformer.parse_args(["--tune"])
  assert e.value.code == 2 and "unrecognized arguments: --tune" in capsys.readouterr().err
  assert not hasattr(pods_transformer.parse_args([]), "tune")


def test_a_batch_larger_than_the_data_is_an_error_not_a_hang(examples_path):
  import _common

  stream = _common.shuffled_batches(np.random.default_rng(0), (np.zeros(5),), 6)
  with pytest.raises(ValueError, match="--batch-size 6 exceeds the 5 training examples"):
    next(stream)


def test_command_line_pastes_back(examples_path, monkeypatch):
  import _common

  script = os.path.join(ROOT, "benchmarks", "paper", "headline.py")
  monkeypatch.setattr(sys, "argv", [script, "--adahessian-config", '{"curvature_floor": 0.1}'])
  expected = "python benchmarks/paper/headline.py --adahessian-config '{\"curvature_floor\": 0.1}'"
  assert _common.command_line() == expected
  assert _common.command_line(["--quick"]) == "python benchmarks/paper/headline.py --quick"


def test_quickstart_refuses_a_bad_flag_before_training(examples_path, monkeypatch, capsys):
  # A negative rate trained uphill; --batch-size 0 failed inside the first jitted step.
  # In this process, as test_examples runs quickstart.main: a fresh one spent ~3 s importing.
  quickstart = importlib.import_module("quickstart")
  monkeypatch.setattr(sys, "argv", ["quickstart.py", "--lr", "-1"])
  with pytest.raises(SystemExit) as e:
    quickstart.main()
  err = capsys.readouterr().err
  assert e.value.code == 2 and "argument --lr: must be a positive number, got '-1'" in err


@pytest.fixture(scope="module")
def diagnose():
  return _script(STABILITY, "diagnose")


def test_diagnose_runs_the_four_exact_rule_cases_of_its_file_by_default(diagnose, capsys):
  # With no argument it ran all five cases into results/diagnosis.json, the DLRM floor + clip
  # case (results/diagnosis_dlrm.json) included; `--help` was an unknown case.
  args = diagnose.parse_args([])
  assert (args.cases, args.name) == (["cnn_k4", "cnn_2x", "mlp_l1", "linear_hinge"], "diagnosis")
  args = diagnose.parse_args(["dlrm_k4_floor_clip", "--name", "diagnosis_dlrm"])
  assert (args.cases, args.name) == (["dlrm_k4_floor_clip"], "diagnosis_dlrm")
  with pytest.raises(SystemExit) as e:
    diagnose.parse_args(["cnn_4k"])
  assert e.value.code == 2 and "unknown case ['cnn_4k']; choose from" in capsys.readouterr().err


@pytest.fixture(scope="module")
def time_to_accuracy():
  return _script(os.path.join(ROOT, "benchmarks"), "time_to_accuracy")


def test_adahessian_config_is_checked_before_anything_trains(paper_cli, time_to_accuracy, capsys):
  # Both failed with a traceback when the AdaHessian rows came, after the other optimizers ran.
  config = '{"curvature_floor": 0.3, "update_clip": 0.05}'
  args = time_to_accuracy.parse_args(["--quick", "--adahessian-config", config])
  assert args.adahessian_config == {"curvature_floor": 0.3, "update_clip": 0.05}
  for parse, argv, message in [
    (
      lambda argv: paper_cli.parse_args("test", argv),
      ["--quick", "--adahessian-config", "{}", "--adahessian-config", '{"curvature_flor": 0.3}'],
      'argument --adahessian-config: {"curvature_flor": 0.3}: adahessian() got an unexpected '
      "keyword argument 'curvature_flor'",
    ),
    (
      time_to_accuracy.parse_args,
      ["--quick", "--adahessian-config", '{"update_clip": 0}'],
      'argument --adahessian-config: {"update_clip": 0}: update_clip must be a real number > 0.0',
    ),
  ]:
    with pytest.raises(SystemExit) as e:
      parse(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_adahessian_config_may_not_set_what_the_experiment_sets(
  paper_cli, time_to_accuracy, capsys
):
  # `hessian_frequency.py --adahessian-config '{"update_freq": 2}'` replaced every column's
  # update_freq (1..5) by 2 under the columns' labels, `block_size.py` likewise with block_size;
  # time_to_accuracy failed with "got multiple values for keyword argument 'update_freq'" after
  # the other optimizers had compiled.
  for key, value in (("update_freq", 2), ("block_size", 4), ("learning_rate", 0.3)):
    config = json.dumps({"curvature_floor": 0.3, key: value})
    for parse in (lambda argv: paper_cli.parse_args("test", argv), time_to_accuracy.parse_args):
      with pytest.raises(SystemExit) as e:
        parse(["--quick", "--adahessian-config", config])
      assert e.value.code == 2
      assert f"argument --adahessian-config: {config}: {key} set by the experiment" in (
        capsys.readouterr().err
      )


def test_time_to_accuracy_tasks_are_checked_like_every_other_name_list(time_to_accuracy, capsys):
  # Its own check said `--tasks: unknown ['cnnn']; choose from ('cnn', 'lm', 'dlrm')`, not in the
  # `argument --tasks:` form of argparse's other errors.
  assert time_to_accuracy.parse_args(["--tasks", "lm, cnn"]).tasks == ["lm", "cnn"]
  assert time_to_accuracy.parse_args([]).tasks == ["cnn", "lm", "dlrm"]
  with pytest.raises(SystemExit) as e:
    time_to_accuracy.parse_args(["--tasks", "cnnn,lm"])
  assert e.value.code == 2
  assert "argument --tasks: unknown ['cnnn']; choose from cnn, lm, dlrm" in capsys.readouterr().err
  # --tasks cnn,cnn trained the CNN twice and wrote one entry.
  with pytest.raises(SystemExit) as e:
    time_to_accuracy.parse_args(["--tasks", "cnn,lm,cnn"])
  assert e.value.code == 2
  assert "argument --tasks: cnn given more than once in 'cnn,lm,cnn'" in capsys.readouterr().err


def test_time_to_accuracy_steps_must_fill_whole_chunks_of_every_task(time_to_accuracy, capsys):
  # --tasks cnn,dlrm --steps 36 trained the CNN (chunk 12), then failed on the DLRM (chunk 60)
  # with a traceback, and the CNN's results were not written.
  tta = time_to_accuracy
  assert tta.parse_args(["--tasks", "cnn,lm", "--steps", "36"]).steps == 36
  assert tta.parse_args(["--quick", "--steps", "16"]).steps == 16
  with pytest.raises(SystemExit) as e:
    tta.parse_args(["--tasks", "cnn,dlrm", "--steps", "36"])
  err = capsys.readouterr().err
  assert e.value.code == 2
  assert "argument --steps: must be a multiple of each task's chunk of steps" in err
  assert "{'cnn': 12, 'dlrm': 60}, got 36" in err


def test_time_to_accuracy_figures_follow_an_out_given(time_to_accuracy, tmp_path):
  # `--out DIR --tasks cnn --steps 24` (a smoke run written elsewhere) drew its figures over the
  # committed benchmarks/figures/time_to_accuracy_cnn.png, next to a JSON they no longer matched.
  tta, out, figures = time_to_accuracy, str(tmp_path / "out"), str(tmp_path / "figures")
  args = tta.parse_args(["--out", out, "--tasks", "cnn", "--steps", "24"])
  assert (args.out, args.figures) == (out, out)
  args = tta.parse_args([])
  assert (args.out, args.figures) == (tta.DEFAULT_OUT, tta.DEFAULT_FIGURES)
  args = tta.parse_args(["--figures", figures])
  assert (args.out, args.figures) == (tta.DEFAULT_OUT, figures)
  args = tta.parse_args(["--out", out, "--figures", figures])
  assert (args.out, args.figures) == (out, figures)
  quick = tta.parse_args(["--quick"])
  assert quick.out == quick.figures and not quick.out.startswith(os.path.join(ROOT, ""))
  assert tta.parse_args(["--quick", "--out", out]).figures == out
  assert tta.parse_args(["--quick", "--figures", figures]).out == quick.out


def test_a_seed_beyond_32_bits_is_a_usage_error(examples_path, capsys):
  # `cv_digits.py --seed 4294967296` failed with scikit-learn's InvalidParameterError traceback
  # about `random_state`, not naming --seed; 2**64 and above overflow jax.random.key too.
  pytest.importorskip("flax")
  import _common
  import curvature_tracking

  for parse in (
    _common.parser("test", 10, 2, ["AdaHessian"]).parse_args,
    lambda a: curvature_tracking.configure(a)[0],
  ):
    for bad in ("4294967296", "18446744073709551616"):
      with pytest.raises(SystemExit) as e:
        parse(["--seed", bad])
      assert e.value.code == 2
      err = capsys.readouterr().err
      assert f"argument --seed: must be an integer in [0, 4294967295], got {bad!r}" in err
    assert parse(["--seed", "4294967295"]).seed == 2**32 - 1


def test_a_context_longer_than_the_validation_text_is_a_usage_error(examples_path, capsys):
  # `--context 100000000` loaded the text, then raised numpy's "ValueError: high <= 0" traceback
  # while drawing the validation windows.
  pytest.importorskip("flax")
  import _common
  import nlp_charlm
  import pods_transformer

  n = len(_common.pydoc_text()[1])
  for script in (nlp_charlm, pods_transformer):
    with pytest.raises(SystemExit) as e:
      script.parse_args(["--quick", "--context", str(n - 1)])
    assert e.value.code == 2
    assert (
      f"argument --context: must be at most {n - 2:,} (the validation text has {n:,} "
      f"characters), got {n - 1:,}"
    ) in capsys.readouterr().err
  assert nlp_charlm.parse_args(["--context", str(n - 2)]).context == n - 2


def test_pods_sizes_the_mesh_cannot_split_are_usage_errors(examples_path, capsys):
  # They failed with jax's IndivisibleError traceback after the model was built.
  pytest.importorskip("flax")
  import pods_transformer

  p = argparse.ArgumentParser(prog="pods_transformer.py")
  ok = argparse.Namespace(batch_size=32, width=128, eval_windows=256)
  pods_transformer.check_device_multiples(p, ok, 8)
  for name in ("batch_size", "width", "eval_windows"):
    args = argparse.Namespace(**{**vars(ok), name: 12})
    with pytest.raises(SystemExit) as e:
      pods_transformer.check_device_multiples(p, args, 8)
    flag, err = "--" + name.replace("_", "-"), capsys.readouterr().err
    assert e.value.code == 2
    assert f"argument {flag}: must be a multiple of the 8 devices, got 12" in err


def test_screen_cells_is_checked_when_parsed():
  # A bad --cells failed with a JSONDecodeError or unpacking traceback after the task was built.
  screen = _script(STABILITY, "screen")
  assert screen.cell_list("[[4, 1], [1, 0.5]]") == [(4, 1), (1, 0.5)]
  for bad in ("foo", "[]", "[[1]]", "[[0, 1]]", "[[1, -1]]", "[[1.5, 1]]", "[[1, 1e999]]"):
    with pytest.raises(argparse.ArgumentTypeError, match=r"JSON list of \[update_freq, lr"):
      screen.cell_list(bad)


def test_list_flags_refuse_a_value_given_twice(paper_cli, monkeypatch, capsys):
  # `hessian_frequency.py --tasks cnn cnn` (and heldout's) trained the task twice,
  # `lr_robustness.py --scales 1 1` each scale, `screen.py --configs exact exact` each config;
  # the comma-separated lists (time_to_accuracy's --tasks) refused the repeat when parsed.
  lr_robustness = _script(PAPER, "lr_robustness")
  hessian_frequency = _script(PAPER, "hessian_frequency")
  heldout = _script(STABILITY, "heldout")
  screen = _script(STABILITY, "screen")
  cases = [
    (lr_robustness, ["--scales", "1", "0.5", "1.0"], "--scales: 1.0 given more than once"),
    (lr_robustness, ["--tasks", "lm", "cnn", "lm"], "--tasks: lm given more than once"),
    (hessian_frequency, ["--tasks", "cnn", "cnn"], "--tasks: cnn given more than once"),
  ]
  for script, argv, message in cases:
    with pytest.raises(SystemExit) as e:
      paper_cli.parse_args("test", argv, script.add_arguments, script.QUICK)
    assert e.value.code == 2 and f"argument {message}" in capsys.readouterr().err
  for argv, message in (
    (["--tasks", "vit", "gru", "vit"], "--tasks: vit given more than once"),
    (["--rows", "floor", "clip", "floor"], "--rows: floor given more than once"),
  ):
    with pytest.raises(SystemExit) as e:
      heldout.parse_args(argv)
    assert e.value.code == 2 and f"argument {message}" in capsys.readouterr().err
  monkeypatch.setattr(sys, "argv", ["screen.py", "--configs", "exact", "floor", "exact"])
  with pytest.raises(SystemExit) as e:
    screen.main()
  assert e.value.code == 2
  assert "argument --configs: exact given more than once" in capsys.readouterr().err
  assert heldout.parse_args(["--tasks", "gru", "vit"]).tasks == ["gru", "vit"]
  assert heldout.parse_args([]).tasks == list(heldout.TASKS)


def test_result_names_and_directories_are_checked_when_parsed(tmp_path, monkeypatch, capsys):
  # `step_time.py --tag ../../x` timed every step, then raised FileNotFoundError writing
  # results/step_time_full_../../x.json; diagnose's --name, heldout's and screen's --out
  # (results/OUT.json) likewise, and `heldout.py --out-dir FILE` with FileExistsError after the
  # first task had trained.
  step_time = _script(os.path.join(ROOT, "benchmarks"), "step_time")
  diagnose = _script(STABILITY, "diagnose")
  heldout = _script(STABILITY, "heldout")
  screen = _script(STABILITY, "screen")
  file = tmp_path / "taken"
  file.write_text("")
  cases = [
    (step_time.parse_args, ["--tag", "../x"], "--tag"),
    (diagnose.parse_args, ["--name", "/tmp/x/y"], "--name"),
    (heldout.parse_args, ["--out", "sub/x"], "--out"),
    (heldout.parse_args, ["--out", ""], "--out"),
  ]
  for parse, argv, flag in cases:
    with pytest.raises(SystemExit) as e:
      parse(argv)
    assert e.value.code == 2
    message = f"argument {flag}: must be a file name without a directory, got {argv[1]!r}"
    assert message in capsys.readouterr().err
  monkeypatch.setattr(sys, "argv", ["screen.py", "--out", "a/b"])
  with pytest.raises(SystemExit) as e:
    screen.main()
  assert e.value.code == 2 and "argument --out: must be a file name" in capsys.readouterr().err
  with pytest.raises(SystemExit) as e:
    heldout.parse_args(["--out-dir", str(file)])
  assert e.value.code == 2
  assert f"argument --out-dir: is a file, not a directory: {str(file)!r}" in (
    capsys.readouterr().err
  )
  assert step_time.parse_args(["--tag", "k1"]).tag == "k1"
  assert step_time.parse_args([]).tag is None
  assert diagnose.parse_args([]).name == "diagnosis"
  assert heldout.parse_args(["--out", "mine"]).out == "mine"


def test_stability_report_says_when_no_cells_have_that_many_seeds(capsys):
  # `report.py --seeds 8` (its docstring's example) printed an empty line: no 8-seed cells are kept.
  report = _script(STABILITY, "report")
  with pytest.raises(SystemExit) as e:
    report.main(["--seeds", "3"])
  assert e.value.code == 1 and "no cells screened with 3 seeds in" in capsys.readouterr().err


def test_heldout_checks_its_tasks_and_a_quick_run_writes_to_a_temp_dir(capsys):
  heldout = _script(STABILITY, "heldout")
  assert heldout.parse_args([]).out_dir == os.path.join(STABILITY, "results")
  args = heldout.parse_args(["--quick", "--tasks", "gru", "diabetes"])
  assert args.tasks == ["gru", "diabetes"]
  assert not os.path.abspath(args.out_dir).startswith(os.path.join(STABILITY, "")), args.out_dir
  with pytest.raises(SystemExit) as e:
    heldout.parse_args(["--tasks", "vit", "cnn"])
  assert e.value.code == 2 and "invalid choice: 'cnn'" in capsys.readouterr().err
  # Every row trains at a tuned rate of its task (the _k3 rows at their rule's).
  rules = {heldout.rate_row(row) for row in heldout.ROWS}
  assert {task: set(lrs) for task, lrs in heldout.TUNED_LR.items()} == dict.fromkeys(
    heldout.TASKS, rules
  )


def test_heldout_trains_the_rows_asked_for_and_the_ablation_at_the_recommended_rate(capsys):
  # The ablation of the GRU's gap (the floor alone, the clip alone, ...) was cited in
  # docs/stability.md from scratch runs; these rows reproduce it, and `--rows` runs only them.
  heldout = _script(STABILITY, "heldout")
  assert heldout.parse_args([]).rows == list(heldout.ROWS)
  args = heldout.parse_args(["--tasks", "gru", "--rows", "floor", "clip", "floor_clip.2"])
  assert args.rows == ["floor", "clip", "floor_clip.2"]
  assert {row: heldout.ROWS[row][1] for row in args.rows} == {
    "floor": {"curvature_floor": 0.3},
    "clip": {"update_clip": 0.05},
    "floor_clip.2": {"curvature_floor": 0.3, "update_clip": 0.2},
  }
  assert heldout.ROWS["recommended_x4"] == ("adahessian", heldout.RECOMMENDED, 1, (4,))
  assert {heldout.rate_row(row) for row in heldout.ABLATION} == {"recommended"}
  assert heldout.rate_row("exact_k3") == "exact"
  with pytest.raises(SystemExit) as e:
    heldout.parse_args(["--rows", "floor", "adam_k3"])
  assert e.value.code == 2 and "invalid choice: 'adam_k3'" in capsys.readouterr().err
  with pytest.raises(SystemExit) as e:  # the tuning's rows are TUNED_LR's
    heldout.parse_args(["--tune", "--rows", "floor"])
  assert e.value.code == 2 and "--rows does not go with --tune" in capsys.readouterr().err


def test_stability_report_tabulates_the_committed_heldout_check():
  report = _script(STABILITY, "report")
  main, ablation = report.main(["--heldout"]).split("\n\n")
  lines = main.splitlines()
  assert lines[0].startswith("| task (metric, steps) | rates: Adam / exact / rec. | AdamW 1x |")
  assert lines[0].endswith("| exact, k=3 1x | recommended, k=3 1x |")
  assert [line.split(" (")[0] for line in lines[2:]] == ["| vit", "| gru", "| diabetes"]
  assert all(line.count("|") == lines[0].count("|") for line in lines)
  # The ablation is a second table (the docs cite its GRU cells), not more columns of the first.
  lines = ablation.splitlines()
  assert lines[0] == (
    "| task (metric, steps) | rate (rec.) | α 0.3 1x | ρ 0.05 1x | α 0.3, ρ 0.2 1x "
    "| α 0.3, ρ 0.05 4x |"
  )
  assert lines[3] == (
    "| gru (loss, 400) | 0.15 | 1.784 ± 0.014 | 1.932 ± 0.025 | 1.862 ± 0.015 | 1.896 ± 0.024 |"
  )
  assert [line.split(" (")[0] for line in lines[2:]] == ["| vit", "| gru", "| diabetes"]


def test_step_time_report_of_a_missing_or_foreign_file_is_a_usage_error(tmp_path, capsys):
  # It failed with a FileNotFoundError traceback.
  pytest.importorskip("flax")
  step_time = _script(os.path.join(ROOT, "benchmarks"), "step_time")
  missing = str(tmp_path / "step_time_ful.json")
  with pytest.raises(SystemExit) as e:
    step_time.main(["--report", missing])
  assert e.value.code == 2
  assert f"argument --report: no such file: {missing!r}" in capsys.readouterr().err
  # Another file failed with a JSONDecodeError (not JSON) or KeyError (another result) traceback.
  not_json = tmp_path / "notes.txt"
  not_json.write_text("timings")
  other = os.path.join(ROOT, "benchmarks", "results", "memory.json")
  for path in (str(not_json), other):
    with pytest.raises(SystemExit) as e:
      step_time.main(["--report", path])
    assert e.value.code == 2
    assert "argument --report: not a step_time results JSON" in capsys.readouterr().err
  committed = os.path.join(ROOT, "benchmarks", "results", "step_time_full.json")
  assert step_time.main(["--report", committed]) == 0
  assert "#### mlp: Flax MLP" in capsys.readouterr().out


def test_quick_keeps_the_values_given_explicitly(examples_path, paper_cli, capsys):
  # --quick overwrote them silently: `nlp_charlm.py --quick --width 48` trained width 32.
  pytest.importorskip("flax")
  import nlp_charlm
  import pods_transformer
  import recsys_dlrm

  args = nlp_charlm.parse_args(["--quick", "--width", "48", "--steps", "50"])
  assert (args.width, args.layers, args.context, args.steps) == (48, 1, 32, 50)
  assert nlp_charlm.parse_args(["--width", "48"]).layers == 2  # no --quick: the full defaults
  assert recsys_dlrm.parse_args(["--quick", "--impressions", "30000"]).impressions == 30_000
  assert recsys_dlrm.parse_args(["--quick"]).impressions == 20_000
  args = pods_transformer.parse_args(["--quick", "--width", "64", "--batch-size", "32"])
  assert (args.width, args.batch_size, args.layers) == (64, 32, 2)
  benchmarks = os.path.join(ROOT, "benchmarks")
  memory = _script(benchmarks, "memory")
  assert (memory.parse_args(["--quick", "--layers", "2"]).layers, memory.QUICK["width"]) == (2, 128)
  _, args = _script(benchmarks, "allocator").parse_args(["--quick", "--model", "cnn"])
  assert (args.model, args.rounds, args.steps) == ("cnn", 1, 6)
  args = _script(benchmarks, "compile_time").parse_args(["--quick", "--transformer"])
  assert (args.depths, args.transformer) == ([1, 2], True)
  lr_robustness = _script(PAPER, "lr_robustness")
  args = paper_cli.parse_args(
    "test", ["--quick", "--tasks", "cnn", "--scales", "1", "3"], lr_robustness.add_arguments,
    lr_robustness.QUICK,
  )  # fmt: skip
  assert (args.tasks, args.scales) == (["cnn"], [1.0, 3.0])
  hessian_frequency = _script(PAPER, "hessian_frequency")
  parse = lambda *a: paper_cli.parse_args(
    "test", ["--quick", *a], hessian_frequency.add_arguments, hessian_frequency.QUICK
  )
  assert (parse().tasks, parse("--tasks", "lm").tasks) == (["cnn"], ["lm"])
  with pytest.raises(SystemExit):  # each flag's help says what --quick makes of it
    nlp_charlm.parse_args(["--help"])
  assert "--quick: 32" in " ".join(capsys.readouterr().out.split())


def test_recsys_refuses_impressions_that_leave_no_training_batch(examples_path, capsys):
  # --quick --impressions 10 built the data, then raised a ValueError traceback from the batches.
  pytest.importorskip("flax")
  import recsys_dlrm

  with pytest.raises(SystemExit) as e:
    recsys_dlrm.parse_args(["--quick", "--impressions", "10"])
  assert e.value.code == 2
  assert "--impressions: 10 impressions leave 8 for training" in capsys.readouterr().err
  assert recsys_dlrm.parse_args(["--impressions", "640"]).impressions == 640  # 512 train


def test_compile_time_refuses_bad_depths_and_repeats(capsys):
  # --repeats 0 failed in statistics.median once the problems were built; --depths 8,x with a
  # ValueError traceback.
  pytest.importorskip("flax")
  compile_time = _script(os.path.join(ROOT, "benchmarks"), "compile_time")
  for flag, value in (("--repeats", "0"), ("--depths", "8,x")):
    with pytest.raises(SystemExit) as e:
      compile_time.parse_args([flag, value])
    assert e.value.code == 2 and f"argument {flag}: must be a positive integer" in (
      capsys.readouterr().err
    )


def test_an_out_of_the_wrong_kind_is_a_usage_error(
  examples_path, paper_cli, time_to_accuracy, tmp_path, monkeypatch, capsys
):
  # An existing file as --out failed only when the results were written (a FileExistsError or
  # NotADirectoryError traceback after the training), and a directory as a JSON file's --out
  # with an IsADirectoryError; tracking_oracle's --out in a new directory with FileNotFoundError.
  pytest.importorskip("flax")
  import _args
  import _common
  import curvature_tracking
  import hessian_analysis

  file = tmp_path / "taken"
  file.write_text("")
  benchmarks = os.path.join(ROOT, "benchmarks")
  tracking_oracle = _script(benchmarks, "tracking_oracle")
  directory_flags = [
    lambda a: _common.parser("test", 10, 2, ["AdaHessian"]).parse_args(a),
    lambda a: paper_cli.parse_args("test", a),
    time_to_accuracy.parse_args,
    _script(benchmarks, "memory").parse_args,
    _script(benchmarks, "step_time").main,
  ]
  mains = [curvature_tracking.main, hessian_analysis.main]
  for parse in directory_flags + mains:
    monkeypatch.setattr(sys, "argv", ["script", "--out", str(file)])
    with pytest.raises(SystemExit) as e:
      parse(["--out", str(file)]) if parse not in mains else parse()
    assert e.value.code == 2
    assert f"argument --out: is a file, not a directory: {str(file)!r}" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    paper_cli.parse_args("test", ["--figures", str(file)])
  assert "argument --figures: is a file" in capsys.readouterr().err
  monkeypatch.setattr(sys, "argv", ["tracking_oracle.py", "--out", str(tmp_path)])
  with pytest.raises(SystemExit) as e:
    tracking_oracle.main()
  assert e.value.code == 2
  assert f"argument --out: is a directory, not a file: {str(tmp_path)!r}" in (
    capsys.readouterr().err
  )
  assert _args.out_file(str(tmp_path / "new" / "x.json")) == str(tmp_path / "new" / "x.json")
  with pytest.raises(argparse.ArgumentTypeError, match="is a file, not a directory"):
    _args.out_file(str(file / "x.json"))


def test_an_out_directory_under_a_file_is_a_usage_error(
  examples_path, paper_cli, time_to_accuracy, tmp_path, capsys
):
  # `--out FILE/sub` (a directory that cannot be made) was accepted: the script trained for
  # minutes, then failed with a NotADirectoryError traceback when it wrote its results.
  pytest.importorskip("flax")
  import _args
  import _common

  file = tmp_path / "taken"
  file.write_text("")
  under = str(file / "sub" / "dir")
  for parse in (
    lambda a: _common.parser("test", 10, 2, ["AdaHessian"]).parse_args(a),
    lambda a: paper_cli.parse_args("test", a),
    time_to_accuracy.parse_args,
  ):
    with pytest.raises(SystemExit) as e:
      parse(["--out", under])
    assert e.value.code == 2
    assert f"argument --out: {str(file)!r} is a file, not a directory: {under!r}" in (
      capsys.readouterr().err
    )
  assert _args.out_dir(str(tmp_path / "new" / "dir")) == str(tmp_path / "new" / "dir")


def test_an_out_in_a_read_only_directory_is_a_usage_error(
  examples_path, paper_cli, time_to_accuracy, tmp_path, monkeypatch, capsys
):
  # `cv_digits.py --out /sys/x` (or any directory the user cannot write in) trained every
  # optimizer, then failed with a PermissionError traceback from os.makedirs in summarize.
  pytest.importorskip("flax")
  import tempfile

  import _common

  read_only = tmp_path / "read_only"
  read_only.mkdir()
  read_only.chmod(0o555)
  make = tempfile.TemporaryFile

  def temporary_file(*args, dir=None, **kwargs):  # root writes in a 0o555 directory anyway
    if dir is not None and os.path.samefile(dir, read_only):
      raise PermissionError(13, "Permission denied")
    return make(*args, dir=dir, **kwargs)

  monkeypatch.setattr(tempfile, "TemporaryFile", temporary_file)
  benchmarks = os.path.join(ROOT, "benchmarks")
  cases = [
    (lambda a: _common.parser("test", 10, 2, ["AdaHessian"]).parse_args(a), "new/dir"),
    (lambda a: _common.parser("test", 10, 2, ["AdaHessian"]).parse_args(a), ""),
    (lambda a: paper_cli.parse_args("test", a), "new"),
    (time_to_accuracy.parse_args, "new"),
    (_script(benchmarks, "compile_time").parse_args, "x.json"),
    (_script(benchmarks, "memory").parse_args, "new"),
  ]
  try:
    for parse, name in cases:
      value = os.path.join(str(read_only), name) if name else str(read_only)
      with pytest.raises(SystemExit) as e:
        parse(["--out", value])
      assert e.value.code == 2
      assert (
        f"argument --out: cannot write in {str(read_only)!r} (Permission denied): {value!r}"
      ) in capsys.readouterr().err
  finally:
    read_only.chmod(0o755)
  assert _common.parser("test", 10, 2, ["AdaHessian"]).parse_args(["--out", str(tmp_path)]).out


class _Parser(Exception):
  """Raised in place of parsing, with the parser a script built."""


def test_every_flag_says_what_it_does(examples_path, monkeypatch):
  # `--help` listed `--batch-size BATCH_SIZE` (cv_digits, nlp_charlm, recsys_dlrm), `--seed SEED`
  # (curvature_tracking), screen's `--tasks` and `--configs`, heldout's `--tasks` with no word of
  # what they set or their default.
  pytest.importorskip("flax")

  def parse_args(self, args=None, namespace=None):
    raise _Parser(self)

  monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_args)
  monkeypatch.setattr(sys, "argv", ["script"])
  benchmarks = os.path.join(ROOT, "benchmarks")
  entries = {
    name: getattr(importlib.import_module(name), entry)
    for name, entry in (
      ("cv_digits", "parse_args"),
      ("nlp_charlm", "parse_args"),
      ("recsys_dlrm", "parse_args"),
      ("pods_transformer", "parse_args"),
      ("curvature_tracking", "configure"),
    )
  }
  for name in ("compile_time", "memory", "step_time", "time_to_accuracy", "tracking_oracle"):
    entries[name] = _script(benchmarks, name).main
  for name in ("screen", "heldout", "diagnose"):
    entries[name] = _script(STABILITY, name).main
  undocumented = []
  for name, entry in entries.items():
    with pytest.raises(_Parser) as e:
      entry()
    for action in e.value.args[0]._actions:
      if action.option_strings and not action.help:
        undocumented.append(f"{name} {action.option_strings[0]}")
  assert not undocumented


def test_compile_time_out_of_the_wrong_kind_is_a_usage_error(tmp_path, capsys):
  # An existing file as its directory failed with FileExistsError, and a directory named *.json
  # with IsADirectoryError, when the result was written, after every problem had compiled.
  pytest.importorskip("flax")
  compile_time = _script(os.path.join(ROOT, "benchmarks"), "compile_time")
  file, directory = tmp_path / "taken", tmp_path / "taken.json"
  file.write_text("")
  directory.mkdir()
  for value, message in ((file, "is a file, not a directory"), (directory, "is a directory")):
    with pytest.raises(SystemExit) as e:
      compile_time.parse_args(["--out", str(value)])
    assert e.value.code == 2
    assert f"argument --out: {message}" in capsys.readouterr().err
  assert compile_time.parse_args(["--out", str(tmp_path / "new.json")]).out == tmp_path / "new.json"


def test_step_time_quick_times_the_groups_asked_for_on_every_model():
  # `--quick --models transformer --groups freq` timed nothing and wrote an empty result: quick
  # mode dropped every sweep of a model other than the MLP, even the ones named in --groups.
  pytest.importorskip("flax")
  step_time = _script(os.path.join(ROOT, "benchmarks"), "step_time")
  args = step_time.parse_args(["--quick", "--models", "transformer", "--groups", "freq"])
  assert list(step_time.planned(args, "transformer")) == ["freq"]
  args = step_time.parse_args(["--quick"])
  assert list(step_time.planned(args, "transformer")) == ["main"]
  assert list(step_time.planned(args, "mlp")) == list(step_time.GROUPS)
  assert list(step_time.planned(step_time.parse_args([]), "cnn")) == list(step_time.GROUPS)


def test_spike_marks_the_steps_it_says_and_its_clean_runs_see_the_same_batches(capsys):
  import jax

  spike = _script(STABILITY, "spike")
  args = spike.parse_args(["--quick", "--tasks", "cnn", "--rows", *spike.ROWS, "--rate", "0.2"])
  assert args.tasks == ["cnn"] and args.rows == list(spike.ROWS) and args.rate == 0.2
  assert not os.path.abspath(args.out_dir).startswith(os.path.join(STABILITY, "")), args.out_dir
  with pytest.raises(SystemExit) as e:
    spike.parse_args(["--rate", "1"])
  assert e.value.code == 2 and "--rate must be below 1" in capsys.readouterr().err
  assert spike.parse_args(["--track"]).track and spike.parse_args(["--ratios"]).ratios
  assert spike.parse_args([]).out_dir == os.path.join(STABILITY, "results")
  # The committed table is the one the docs print.
  table = spike.main(["--report"])
  assert "| recommended_cclip | 98.8 ± 0.4 |" in spike.table(table)
  # The rows with the clip are the rows without it plus curvature_clip, at the same rate.
  assert spike.ROWS["recommended_cclip"][1] == {**spike.RECOMMENDED, "curvature_clip": 10.0}
  task = spike.C.get_task("cnn")
  steps = spike.spike_steps(0, 40, 0.2)
  assert 0 < len(steps) < 40
  # The trainer's keys of seed 0 (benchmarks/paper/training.compiled_run).
  _, k_data, _ = jax.random.split(jax.random.key(0), 3)
  keys = jax.random.split(k_data, 40)
  spiky, clean = spike.spiky(task, 0.2, 1e10), spike.spiky(task, 0.0, 1e10)
  scales = [float(spiky.sample(task.data, k)[1]) for k in keys]
  assert [t for t, s in enumerate(scales) if s != 1.0] == steps
  assert {s for s in scales if s != 1.0} == {1e10}
  a, b = spiky.sample(task.data, keys[steps[0]]), clean.sample(task.data, keys[steps[0]])
  assert float(b[1]) == 1.0
  jax.tree.map(np.testing.assert_array_equal, a[0], b[0])
  params = task.init(jax.random.key(1))
  np.testing.assert_allclose(spiky.loss(params, a), 1e10 * task.loss(params, a[0]), rtol=1e-6)


def test_step_time_report_names_curvature_clip_only_where_the_table_has_its_row(capsys):
  # Every `stabilized` table was headed "..., without and with curvature_clip", also those of
  # step_time_full_k1.json, which has no curvature_clip row.
  pytest.importorskip("flax")
  step_time = _script(os.path.join(ROOT, "benchmarks"), "step_time")
  results = os.path.join(ROOT, "benchmarks", "results")
  for name, clip in (("step_time_full_k1.json", False), ("step_time_full_clip.json", True)):
    assert step_time.main(["--report", os.path.join(results, name)]) == 0
    out = capsys.readouterr().out
    assert out.count("Exact rule vs the recommended stabilizers") == 3
    assert out.count("| AdaHessian fused k=1 stabilized + curvature_clip=5 |") == (3 if clip else 0)
    assert out.count("stabilizers, without and with curvature_clip:") == (3 if clip else 0)
    assert out.count("stabilizers:") == (0 if clip else 3)


def test_quick_flags_help_states_the_default_beside_the_quick_one(examples_path, capsys):
  # A flag with a help of its own got only "(--quick: 2)": `nlp_charlm.py --help` gave no
  # default for --heads or --block-size, `pods_transformer.py --help` none for --batch-size,
  # --width, --heads, --block-size or --eval-windows.
  pytest.importorskip("flax")
  import nlp_charlm
  import pods_transformer
  import recsys_dlrm

  def shown(parse):
    with pytest.raises(SystemExit):
      parse(["--help"])
    return " ".join(capsys.readouterr().out.split())

  text = shown(nlp_charlm.parse_args)
  assert "--heads HEADS a divisor of --width (default 4; --quick: 2)" in text
  assert "--block-size BLOCK_SIZE AdaHessian's averaging block (default 32; --quick: 16)" in text
  assert "--width WIDTH default 64; --quick: 32" in text  # no help of its own: as before
  text = shown(pods_transformer.parse_args)
  assert "a multiple of the device count (default 32; --quick: 16)" in text
  assert "--heads HEADS a divisor of --width (default 4; --quick: 2)" in text
  text = shown(recsys_dlrm.parse_args)
  assert "train + validation size (default 1000000; --quick: 20000)" in text
  # A help that states its default keeps it once.
  text = shown(_script(os.path.join(ROOT, "benchmarks"), "allocator").parse_args)
  assert "--rounds ROUNDS processes per setting (default 3; --quick: 1)" in text
  assert "--steps STEPS timed steps per optimizer and process (default 80; --quick: 6)" in text


def test_stability_quick_runs_are_smoke_runs_and_the_spike_table_lists_the_rows_trained():
  # `spike.py --quick` and `heldout.py --quick` trained every row with 4 seeds on the full-size
  # tasks (28 and 27 compiled programs; neither ended in 400 s), and spike's table listed the rows
  # not trained with empty cells. A smoke run is one seed of a few rows on the small tasks; flags
  # given keep their values.
  spike = _script(STABILITY, "spike")
  heldout = _script(STABILITY, "heldout")
  args = spike.parse_args(["--quick"])
  assert (args.tasks, args.rows, args.seeds) == (["cnn"], ["exact", "exact_cclip"], 1)
  args = spike.parse_args(["--quick", "--tasks", "lm", "--seeds", "2"])
  assert (args.tasks, args.rows, args.seeds) == (["lm"], ["exact", "exact_cclip"], 2)
  args = spike.parse_args([])
  assert (args.tasks, args.rows, args.seeds) == (["cnn", "lm"], list(spike.ROWS), 4)
  args = heldout.parse_args(["--quick"])
  assert (args.tasks, args.rows, args.seeds) == (
    list(heldout.TASKS),
    ["exact", "recommended_k3"],
    1,
  )
  args = heldout.parse_args(["--quick", "--rows", "floor", "--seeds", "3"])
  assert (args.rows, args.seeds) == (["floor"], 3)
  assert heldout.parse_args([]).seeds == 4
  assert heldout.parse_args(["--quick", "--tune"]).tune  # its rows are TUNED_LR's, not --rows
  failed = {"n": 1, "failed": 1, "mean": None}
  cells = {f"exact/{kind}": {"summary": failed} for kind in ("clean", "spiky")}
  store = {"tasks": {"cnn": {"metric": "acc", "cells": cells}}}
  assert spike.table(store).splitlines() == [
    "| row | cnn clean | cnn spiky |",
    "|---|---|---|",
    "| exact | all 1 failed | all 1 failed |",
  ]
