"""One validation for a job's settings, on the command line and in the dashboard's Launch form:
counts that must be positive, a run directory's name, `--aggregator` without image features, and (in
the form only) paths that must stay inside the data root."""

from __future__ import annotations

import pytest

from trainer.config import TrainConfig

BAD_TRAIN = [
    ({"max_steps": "-1"}, "max_steps", "--max-steps must be >= 0"),
    ({"epochs": "0"}, "epochs", "--epochs must be >= 1"),
    ({"mode": "ar", "workers": "0"}, "workers", "--workers must be >= 1"),
    ({"batch_size": "-5"}, "batch_size", "--batch-size must be >= 1"),
    ({"features": "ids", "aggregator": "sum"}, "aggregator", "--aggregator sum aggregates behaviour images, which "
                                                              "--features ids does not use"),
]


@pytest.mark.parametrize("flags, field, message", BAD_TRAIN)
def test_a_bad_count_on_the_command_line_exits_2_naming_the_flag(flags, field, message, tmp_path, capsys):
    from vitrine.cli import main

    argv = ["train", "--dataset", str(tmp_path / "ds"), "--no-track"]
    for k, v in flags.items():
        argv += [f"--{k.replace('_', '-')}={v}"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err


def test_the_form_refuses_the_same_settings_and_paths_outside_the_data_root(tmp_path, monkeypatch):
    from app import forms

    root = tmp_path / "data"
    monkeypatch.setenv("VITRINE_DATA", str(root))
    ds = str(root / "processed" / "none")
    # Each bad count, with the command line's own message, under its own field.
    for flags, field, message in BAD_TRAIN:
        argv, errors = forms.prepare("train", {"dataset": ds, **flags}, tmp_path)
        assert argv is None and message in errors.get(field, ""), (flags, errors)
    # Every problem at once (Check shows them all), paths included.
    raw = {"dataset": ds, "max_steps": "-3", "epochs": "0", "run_dir": "/etc/vitrine-run"}
    argv, errors = forms.prepare("train", raw, tmp_path)
    assert argv is None
    assert "--max-steps must be >= 0" in errors["max_steps"] and "--epochs must be >= 1" in errors["epochs"]
    assert "outside the data root" in errors["run_dir"]
    for run_dir, message in [(f"{root}/runs/x; touch pwned", "may hold only letters"),
                             (f"{root}/runs/../../../etc/r", "'..' is not allowed"),
                             ("runs/..", "'..' is not allowed")]:
        _, errors = forms.prepare("train", {"dataset": ds, "run_dir": run_dir}, root)
        assert message in errors.get("run_dir", ""), (run_dir, errors)
    _, errors = forms.prepare("train", {"dataset": "/etc"}, tmp_path)
    assert "outside the data root" in errors["dataset"]
    _, errors = forms.prepare("pipeline", {"raw": "/etc", "out": str(root / "processed" / "p"), "workers": "0",
                                           "test_frac": "1.5"}, tmp_path)
    assert "outside the data root" in errors["raw"] and "--workers must be >= 1" in errors["workers"]
    assert "--test-frac must be in (0, 1)" in errors["test_frac"]
    _, errors = forms.prepare("generate", {"out": "/tmp/elsewhere"}, tmp_path)
    assert "outside the data root" in errors["out"]
    # A relative path is taken from the dashboard's directory and must land in the data root too.
    _, errors = forms.prepare("generate", {"out": "raw/w"}, root)
    assert "out" not in errors, errors


def test_max_steps_0_still_means_every_epoch_and_run_dir_names_stay_plain():
    assert TrainConfig(max_steps=0).problems() == []
    assert TrainConfig(run_dir="/tmp/runs/dicm-ids+images-attentive-s0-20261207-120000-a1b2c3").problems() == []
    assert TrainConfig(features="ids", aggregator="attentive").problems() == []  # the default says nothing
    (exc,) = TrainConfig(run_dir="runs/a b").problems()
    assert "--run-dir 'runs/a b'" in str(exc)
