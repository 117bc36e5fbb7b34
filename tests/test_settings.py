"""Every setting is declared once and the command line is derived from it: each TrainConfig and
PretrainOptions field, set to a value other than its default, comes back unchanged through
`lmforge pretrain`'s options and through the speedrun's torchrun re-entry. The values are derived
from the declarations, so a field added later is covered without touching this file."""
from __future__ import annotations

import dataclasses

import pytest

from lmforge.cli import build_parser
from lmforge.cli.common import declared, flag_of, options_argv, train_config
from lmforge.cli.speedrun import apply_preset, pretrain_argv, pretrain_settings
from lmforge.stages.options import PretrainOptions
from lmforge.train.loop import TrainConfig


def other_value(f: dataclasses.Field):
    """A valid value other than the field's default, from its declaration alone."""
    kind = str(f.type).split("|")[0].strip()
    if f.metadata["choices"]:
        return next(c for c in f.metadata["choices"] if c != f.default)
    if kind == "bool":
        return not f.default
    if kind == "int":
        return (f.default or 0) + 3
    if kind == "float":
        return 0.375 if f.default is None else f.default * 0.5 + 0.125
    return f"{f.default}-other"


def changed(cls, **fixed):
    return cls(**{**{f.name: other_value(f) for f in declared(cls)}, **fixed})


def test_every_declared_field_is_an_option_with_help():
    parser = build_parser()
    pretrain = parser._subparsers._group_actions[0].choices["pretrain"]  # noqa: SLF001 (reading, not editing)
    options = {o for a in pretrain._actions for o in a.option_strings}
    for cls in (TrainConfig, PretrainOptions):
        for f in declared(cls):
            assert flag_of(f) in options, f"{cls.__name__}.{f.name} has no option"
            assert f.metadata["help"].strip()
    assert {f.name for f in declared(TrainConfig)} == {f.name for f in dataclasses.fields(TrainConfig)}


def test_train_config_round_trips_through_pretrain_options():
    cfg = changed(TrainConfig)
    opts = changed(PretrainOptions, data_dir="data")
    assert all(getattr(cfg, f.name) != f.default for f in declared(TrainConfig))
    args = build_parser().parse_args(["pretrain", "--data-dir", "data", *options_argv(cfg), *options_argv(opts)])
    assert train_config(args) == cfg
    assert {f.name: getattr(args, f.name) for f in declared(PretrainOptions)} == \
        {f.name: getattr(opts, f.name) for f in declared(PretrainOptions)}


def test_speedrun_reenters_pretrain_with_every_setting():
    """What the speedrun's torchrun processes parse is what the speedrun would train with itself."""
    cfg = changed(TrainConfig, out_dir="run/pretrain")
    speedrun_opts = [a for f in declared(PretrainOptions) if f.name != "resume"
                     for a in options_argv(changed(PretrainOptions, data_dir="x"), [f.name])]
    argv = [a for a in options_argv(cfg) if a not in ("--out", "run/pretrain")]
    args = build_parser().parse_args(["speedrun", "--model", "tiny", "--set", "qk_norm=false", *argv, *speedrun_opts])
    apply_preset(args)
    opts, stage_cfg = pretrain_settings(args, "run/data", "run/pretrain")
    assert stage_cfg == cfg
    back = build_parser().parse_args(pretrain_argv(opts, stage_cfg))
    assert train_config(back) == cfg
    assert (back.arch, back.model_preset, back.set, back.data_dir) == ("transformer", "tiny", ["qk_norm=False"],
                                                                       "run/data")
    for f in declared(PretrainOptions):
        assert getattr(back, f.name) == getattr(opts, f.name), f.name


def test_a_setting_that_cannot_be_written_is_an_error():
    from lmforge.common import LmforgeError

    with pytest.raises(LmforgeError, match="max_steps=None"):
        options_argv(TrainConfig(max_steps=None))


def test_old_spellings_still_work_with_a_warning(capsys):
    args = build_parser().parse_args(["pretrain", "--data-dir", "d", "--out", "o", "--preset", "tiny"])
    assert args.model_preset == "tiny"
    assert "--preset is deprecated" in capsys.readouterr().err
    args = build_parser().parse_args(["grpo", "--checkpoint", "c", "--out", "o", "--batch-size", "3"])
    assert args.prompts_per_step == 3
    assert "use --prompts-per-step" in capsys.readouterr().err


def test_stage_defaults_reach_their_commands():
    from lmforge.stages.options import (
        DPO_TRAIN_DEFAULTS,
        KL_BETA,
        REWARD_TRAIN_DEFAULTS,
        RL_TRAIN_DEFAULTS,
        SFT_TRAIN_DEFAULTS,
    )

    parser = build_parser()
    pairs = ["--checkpoint", "c", "--data", "d", "--out", "o"]
    for argv, defaults in ((["sft", *pairs], SFT_TRAIN_DEFAULTS), (["reward", "train", *pairs], REWARD_TRAIN_DEFAULTS),
                           (["dpo", *pairs], DPO_TRAIN_DEFAULTS),
                           (["ppo", "--checkpoint", "c", "--out", "o"], RL_TRAIN_DEFAULTS)):
        cfg = train_config(parser.parse_args(argv))
        assert {k: getattr(cfg, k) for k in defaults} == defaults, argv[0]
    assert parser.parse_args(["ppo", "--checkpoint", "c", "--out", "o"]).kl_beta == KL_BETA["ppo"]
    assert parser.parse_args(["grpo", "--checkpoint", "c", "--out", "o"]).kl_beta == KL_BETA["grpo"]
