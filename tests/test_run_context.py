"""Config loading/overrides and the stage run context."""

from __future__ import annotations

import pytest

from utils.config import ConfigError, apply_overrides, load_config
from utils.run_context import run_configured_sentinels


def test_default_config_loads_and_overrides_are_typed():
    cfg = load_config(
        None, ["stage1.n_train=12", "model.dtype=bfloat16", "stage1.gates.min_records=3"]
    )
    assert cfg["stage1"]["n_train"] == 12 and cfg["model"]["dtype"] == "bfloat16"
    assert cfg["stage1"]["gates"]["min_records"] == 3


def test_unknown_override_key_is_an_error():
    with pytest.raises(ConfigError, match="unknown key 'stage1.n_trian'"):
        apply_overrides({"stage1": {"n_train": 1}}, ["stage1.n_trian=3"])
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_overrides({}, ["nonsense"])


def test_sentinel_mode_off_parsed_from_yaml(tiny_qwen):
    # Regression (KNOWN_BUGS #10): YAML reads `off` as False; it must still mean "off".
    cfg = load_config(None, ["sentinels.mode=off"])
    assert cfg["sentinels"]["mode"] is False
    assert run_configured_sentinels(tiny_qwen, cfg["sentinels"]) == {
        "mode": "off",
        "verdict": "not run",
    }


def test_config_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_stage_main_closes_the_process_group_a_torchrun_stage_opened(tmp_path):
    """KNOWN_BUGS 33: a rank that exits with gloo's process group open can abort ("terminate
    called without an active exception"), failing a torchrun stage that finished."""
    import torch.distributed as dist

    from utils.run_context import stage_main

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        assert stage_main("t", None, lambda: 0) == 0
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
