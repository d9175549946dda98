"""scripts/profile_grouped_cuda.py's --fill: a byte that is valid E4M3 data, refused with the fix
named before anything needs a GPU."""
from __future__ import annotations

import argparse
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts"))

import profile_grouped_cuda as profile  # noqa: E402


@pytest.mark.parametrize("text,value", [("0x38", 0x38), ("56", 56), ("0", 0), ("0xfe", 0xFE)])
def test_fill_takes_a_byte_in_decimal_or_hex(text, value):
    assert profile.fill_byte(text) == value


@pytest.mark.parametrize("text,names", [("0x7f", "NaN"), ("0xff", "NaN"), ("256", "0..0xff"),
                                        ("-3", "0..0xff"), ("one", "not a number")])
def test_fill_refuses_what_is_not_e4m3_data(text, names):
    with pytest.raises(argparse.ArgumentTypeError, match=names):
        profile.fill_byte(text)


def test_a_bad_fill_stops_the_script_before_it_looks_for_a_gpu(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["profile_grouped_cuda.py", "--op", "wgrad", "--fill", "0x7f"])
    with pytest.raises(SystemExit) as stop:
        profile.main()
    assert stop.value.code == 2  # argparse's usage error, not the missing-GPU exit
    assert "E4M3's NaN" in capsys.readouterr().err
