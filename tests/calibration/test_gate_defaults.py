"""The accuracy gate gates by default, with each mode's limit; random-weight sources are report-only."""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import pytest

from retrv.calibration.cli import register
from retrv.calibration.config import Int4WeightOnlyConfig, Int8DynamicConfig, Int8StaticConfig, Int8WeightOnlyConfig
from retrv.calibration.quantize import gate_limit
from retrv.runtime.errors import InputError
from retrv.runtime.pack import Pack

REAL = SimpleNamespace(manifest=SimpleNamespace(extra={}))  # a pack whose source declares nothing: real weights


def test_each_mode_gates_by_default_with_its_own_limit():
    assert gate_limit(Int4WeightOnlyConfig(), REAL) == (0.25, "default for --mode int4 --algo mse (calibrated on real weights)")
    assert gate_limit(Int8DynamicConfig(), REAL)[0] == Int8DynamicConfig.default_max_drop == 0.3
    assert Int8StaticConfig.default_max_drop == 0.3
    assert gate_limit(Int8WeightOnlyConfig(), REAL) == (0.15, "default for --mode int8-weight (calibrated on real "
                                                              "weights)")
    assert gate_limit(Int8DynamicConfig(max_drop=0.02), REAL) == (0.02, "--max-drop")
    assert gate_limit(Int8DynamicConfig(max_drop=None), REAL) == (None, "report only (asked)")


def test_a_random_weight_source_is_report_only(tiny_pack):
    src = Pack.open(tiny_pack)
    assert src.manifest.extra["random_weights"] is True  # tiny checkpoints declare it; the exporter records it
    limit, why = gate_limit(Int4WeightOnlyConfig(), src)
    assert limit is None and "random weights" in why


def _parse(argv):
    ap = argparse.ArgumentParser()
    register(ap.add_subparsers())
    from retrv.calibration.cli import build_config

    return build_config(ap.parse_args(["quantize", "p", "o", *argv]))


def test_cli_max_drop_default_none_and_number():
    assert _parse(["--mode", "int4"]).max_drop == "default"
    assert _parse(["--mode", "int4", "--max-drop", "none"]).max_drop is None
    assert _parse(["--mode", "int8-dynamic", "--max-drop", "0.05"]).max_drop == 0.05


def test_cli_int4_int_zero_projections():
    assert _parse(["--mode", "int4"]).int_zero == ()  # the offset form everywhere (docs/BENCHMARKS.md)
    assert _parse(["--mode", "int4", "--int-zero", "o_proj,down_proj"]).int_zero == ("o_proj", "down_proj")
    assert _parse(["--mode", "int4", "--int-zero", "none"]).int_zero == ()
    with pytest.raises(InputError, match="--int-zero: applies to --mode int4; got --mode int8-weight"):
        _parse(["--mode", "int8-weight", "--int-zero", "o_proj"])
    with pytest.raises(InputError, match="--int-zero: applies to the offset form"):
        _parse(["--mode", "int4", "--zero-point", "int", "--int-zero", "o_proj"])


@pytest.mark.parametrize("make,value,message", [
    (lambda v: Int4WeightOnlyConfig(int_zero=v), 5, "--int-zero: got 5"),
    (lambda v: Int4WeightOnlyConfig(int_zero=v), ("o_proj", ""), "--int-zero: got \\('o_proj', ''\\)"),
    (lambda v: Int8DynamicConfig(blockwise=v), None, "--blockwise: got None"),
    (lambda v: Int8DynamicConfig(keep_matmuls=v), 3, "keep_matmuls: got 3")])
def test_projection_names_that_are_not_a_sequence_of_names_are_refused_in_one_line(make, value, message):
    with pytest.raises(InputError, match=message + "; expected projection names"):
        make(value)
    assert make(["down_proj"]) is not None  # a list, as a manifest's JSON gives back, is a sequence of names


def test_bad_keep_matmuls_is_refused_by_name():
    with pytest.raises(InputError, match="keep_matmuls: got 'down_proj'"):
        Int8DynamicConfig(keep_matmuls="down_proj")


def test_cli_int8_dynamic_blockwise_projections():
    assert _parse(["--mode", "int8-dynamic"]).blockwise == ("down_proj",)  # docs/BENCHMARKS.md: its input's range
    assert _parse(["--mode", "int8-dynamic", "--blockwise", "none"]).blockwise == ()
    assert _parse(["--mode", "int8-dynamic", "--blockwise", "down_proj,o_proj"]).blockwise == ("down_proj", "o_proj")
    with pytest.raises(InputError, match="--blockwise: applies to --mode int8-dynamic; got --mode int4"):
        _parse(["--mode", "int4", "--blockwise", "down_proj"])
    with pytest.raises(SystemExit):  # argparse's own one-line usage error
        _parse(["--mode", "int8-dynamic", "--blockwise", "down proj;"])
    with pytest.raises(InputError, match="--blockwise: got 'down_proj'"):
        Int8DynamicConfig(blockwise="down_proj")
    assert Int8DynamicConfig(keep_matmuls=("down_proj",)).blockwise == ()  # kept in fp32 wins
    with pytest.raises(InputError, match="blockwise_block_size: got 24"):
        Int8DynamicConfig(blockwise_block_size=24)


def test_cli_int8_weight_takes_a_block_size_and_refuses_int4_flags():
    config = _parse(["--mode", "int8-weight", "--block-size", "64"])
    assert isinstance(config, Int8WeightOnlyConfig) and config.block_size == 64 and config.max_drop == "default"
    # blocks of 128 by default (docs/BENCHMARKS.md: faster decode, inside the gate); int4 keeps 32 (the Q4_1 grid)
    assert _parse(["--mode", "int8-weight"]).block_size == 128 and _parse(["--mode", "int4"]).block_size == 32
    with pytest.raises(InputError, match="--algo: applies to --mode int4; got --mode int8-weight"):
        _parse(["--mode", "int8-weight", "--algo", "hqq"])
    with pytest.raises(InputError, match="--block-size: got 24"):
        Int8WeightOnlyConfig(block_size=24)


def test_cli_int4_defaults_to_the_searched_offset_form_and_float_zeros_only_with_rtn():
    config = _parse(["--mode", "int4"])
    assert (config.algo, config.zero_point) == ("mse", "offset")  # the fast kernel + the Q4_1 grid, searched
    assert _parse(["--mode", "int4", "--zero-point", "int"]).zero_point == "int"
    assert _parse(["--mode", "int4", "--algo", "rtn", "--zero-point", "float"]).zero_point == "float"
    with pytest.raises(InputError, match="--zero-point float: applies to --algo rtn; got --algo mse"):
        _parse(["--mode", "int4", "--zero-point", "float"])
    with pytest.raises(InputError, match="--zero-point: got 'half'"):
        Int4WeightOnlyConfig(zero_point="half")
    with pytest.raises(InputError, match="--zero-point: applies to --mode int4; got --mode int8-weight"):
        _parse(["--mode", "int8-weight", "--zero-point", "int"])
