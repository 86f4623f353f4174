"""train --config (YAML / JSON, the command line overrides it, a run's config.json reproduces it), the recipe files,
timm-style option aliases, --opt / --sched through timm, and the CLI's help and usage on mistakes."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import yaml

from skinlesion.cli import build_parser, main, parse
from skinlesion.commands.train import train_options
from skinlesion.training import builders
from skinlesion.training.config import TrainConfig
from skinlesion.training.recipes import RECIPES

REPO = Path(__file__).resolve().parents[1]


def resolved(*argv: str) -> dict:
    return train_options(parse(["train", *argv]))[0].to_dict()


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_files_are_the_recipes(name):
    path = REPO / "configs" / f"{name}.yaml"
    values = {k.replace("-", "_"): v for k, v in yaml.safe_load(path.read_text()).items()}
    assert values["recipe"] == name
    assert TrainConfig.from_dict({**TrainConfig().to_dict(), **values}) == RECIPES[name]
    assert resolved("--config", str(path)) == resolved("--recipe", name) == RECIPES[name].to_dict()


def test_config_round_trips_and_bad_values_are_one_line_naming_the_key(tmp_path, capsys):
    config = RECIPES["improved"].replace(lr=5e-4, mean=(0.5, 0.5, 0.5), run_name="x")
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    path = tmp_path / "bad.yaml"
    cases = [("epochs: [1, 2]\n", "epochs: expected one value"), ("mean: 0.5\n", "expected three numbers"),
             ("data_dir: 5\n", "expected a string"), ("backbone: {x: 1}\n", "backbone: expected a value"),
             ("amp: maybe\n", "amp: expected true or false"), ("lr: 1e300\n", "lr: expected a finite number"),
             ("img-size: 100000\n", "<= 1024"), ("seed: -1\n", ">= 0"), ("run-name: ../../x\n", "plain folder"),
             ("a: &x [1]\nb: *x\n", "aliases"), ("min-sensitivity: mel=2\n", "CLASS=FRACTION")]  # fmt: skip
    for text, message in cases:
        path.write_text(text)
        assert main(["train", "--config", str(path)]) == 2, text
        err = capsys.readouterr().err
        assert err.startswith("error: --config") and message in err and len(err.strip().splitlines()) == 1, err


def test_command_line_overrides_the_file_and_values_are_checked(tmp_path, capsys):
    path = tmp_path / "mine.yaml"
    path.write_text("recipe: improved\nlr: 5.0e-4\nimg-size: 160\ntta_views: 4\n")
    cfg = resolved("--config", str(path), "--lr", "2e-4")
    assert (cfg["lr"], cfg["img_size"], cfg["tta_views"], cfg["metadata_prior"]) == (2e-4, 160, 4, True)
    json_path = tmp_path / "mine.json"
    json_path.write_text(json.dumps({"epochs": 3, "batch-size": 8}))
    from_json = resolved("--config", str(json_path))
    assert (from_json["epochs"], from_json["batch_size"]) == (3, 8)
    cases = [("lr: -1\n", "lr: expected a finite number > 0"), ("img_sze: 1\n", "did you mean img_size"),
             ("tta-views: 5\n", "tta_views: 5 is not one of 4, 8"), ("- a\n", "expected a mapping")]  # fmt: skip
    for text, message in cases:
        path.write_text(text)
        assert main(["train", "--config", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --config") and message in err and len(err.strip().splitlines()) == 1


def test_a_runs_config_json_reproduces_it(tiny_run):
    saved = json.loads((tiny_run / "config.json").read_text())
    again = resolved("--config", str(tiny_run / "config.json"))
    differs = {k for k in again if k in saved and again[k] != saved[k]}
    # None = resolved later: the backbone's mean / std; the global batch the per-process batch gives (config.json
    # records the global batch the run had, and as --config it is not a request)
    assert differs <= {"global_batch_size"} and all(again[k] is None for k in differs)
    assert again["batch_size"] == saved["batch_size"]
    assert {k for k in again if k not in saved} == set()  # every resolved option was recorded


def test_timm_spellings_mean_the_same():
    timm_style = resolved("--model", "resnet18", "--experiment", "x", "--output", "o", "--smoothing", "0.1",
                          "--model-ema", "--drop", "0.3", "--grad-accum-steps", "2", "--torchcompile", "-b", "16",
                          "-j", "1", "--initial-checkpoint", "w.pth")  # fmt: skip
    ours = resolved("--backbone", "resnet18", "--run-name", "x", "--out", "o", "--label-smoothing", "0.1", "--ema",
                    "--drop-rate", "0.3", "--grad-accum", "2", "--compile", "--batch-size", "16", "--workers", "1",
                    "--weights", "w.pth")  # fmt: skip
    assert timm_style == ours


def test_opt_and_sched_come_from_timm(synth_dir, tmp_path):
    import timm
    import torch

    model = timm.create_model("test_efficientnet", num_classes=7)
    base = RECIPES["reference"]
    assert type(builders.build_optimizer(base, model)) is torch.optim.AdamW  # the recipes' optimizer, unchanged
    sgd = builders.build_optimizer(base.replace(opt="sgd"), model)
    assert isinstance(sgd, torch.optim.SGD) and [g["lr_scale"] for g in sgd.param_groups] == [1.0, 1.0]
    step = builders.build_scheduler(base.replace(sched="step", epochs=6), sgd, steps_per_epoch=10)
    lrs = []
    for t in range(60):
        step.step_update(t)
        lrs.append(sgd.param_groups[0]["lr"])
    assert lrs[0] == lrs[19] > lrs[20] == lrs[39] > lrs[40]  # decays every epochs // 3
    argv = ["train", "--data-dir", str(synth_dir), "--out", str(tmp_path), "--run-name", "sgd", "--opt", "sgd",
            "--sched", "tanh", "--backbone", "efficientnet_b0", "--no-pretrained", "--img-size", "32", "--epochs", "2",
            "--batch-size", "16", "--workers", "0", "--max-train-batches", "2"]  # fmt: skip
    assert main(argv) == 0
    assert json.loads((tmp_path / "sgd" / "config.json").read_text())["opt"] == "sgd"


def test_every_subcommand_and_option_explains_itself():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    devices = set()
    for name, p in sub.choices.items():
        assert p.description and f"docs/usage.md#skinlesion-{name}" in p.description
        for action in p._actions:
            if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
                continue
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"
            if action.dest == "device":
                devices.add(tuple(action.choices))
    assert devices == {("auto", "cuda", "mps", "cpu")}  # the same choices everywhere


def test_an_unknown_option_prints_that_subcommands_usage(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["train", "--learning-rate", "1e-3"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: skinlesion train") and "unrecognized arguments: --learning-rate" in err
    with pytest.raises(SystemExit):
        main(["evaluate", "--run-dir", "x", "--tta-viewz", "8"])
    assert "did you mean --tta-views?" in capsys.readouterr().err
