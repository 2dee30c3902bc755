"""The ``tt-conv`` command line: compress and inspect saved models, and its error messages."""

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from tt_conv import FactorizedConv
from tt_conv.cli import main, parse_rank_argument
from conftest import threads_fixture


_one_thread = threads_fixture(1)


@pytest.fixture
def model_file(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 32, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 4),
    )
    path = tmp_path / "model.pt"
    torch.save(model, path)
    return path


def test_compress_writes_the_model_and_the_report(model_file, tmp_path, capsys):
    out, report = tmp_path / "out" / "small.pt", tmp_path / "report.md"
    code = main(["compress", str(model_file), "--rank", "0.25", "--factorization", "tucker",
                 "--out", str(out), "--report", str(report), "--input-shape", "1,3,16,16"])
    assert code == 0
    model = torch.load(out, weights_only=False)
    assert isinstance(model[2], FactorizedConv) and model[2].factorization == "tucker"
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 4)
    text = report.read_text()
    assert text.startswith("**tt_conv.compress**") and "| 2 | 32x16x3x3 | tucker |" in text
    printed = capsys.readouterr().out
    assert "total (convs)" in printed and f"saved tt_conv model to {out}" in printed


def test_compress_export_loads_without_tt_conv(model_file, tmp_path):
    out, report = tmp_path / "plain.pt", tmp_path / "report.json"
    assert main(["compress", str(model_file), "--rank", "energy:0.9", "--factorization", "cp",
                 "--out", str(out), "--report", str(report), "--export", "--quiet"]) == 0
    assert json.loads(report.read_text())["rank"] == "0.9 of the spectral energy"
    script = ("import sys; sys.modules['tt_conv'] = None\nimport torch\n"
              f"m = torch.load({str(out)!r}, weights_only=False)\n"
              "print(m(torch.randn(1, 3, 8, 8)).shape)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120)
    assert result.stdout.strip() == "torch.Size([1, 4])", result.stderr


def test_compress_with_calibration_and_global_budget(model_file, tmp_path, capsys):
    batch = tmp_path / "batch.pt"
    torch.save(torch.randn(8, 3, 16, 16), batch)
    out = tmp_path / "small.pt"
    assert main(["compress", str(model_file), "--rank", "params:0.3", "--global",
                 "--factorization", "auto", "--calibration", str(batch), "--out", str(out),
                 "--exclude", "0"]) == 0
    printed = capsys.readouterr().out
    assert "shared energy threshold" in printed and "output error" in printed
    assert "0: not selected" in printed


def test_inspect_lists_convolutions_and_savings(model_file, tmp_path, capsys):
    listing = tmp_path / "inspect.json"
    assert main(["inspect", str(model_file), "--input-shape", "1,3,16,16", "--json",
                 str(listing)]) == 0
    printed = capsys.readouterr().out
    assert "tucker (EVBMF)" in printed and "32x16x3x3" in printed and "EVBMF cp:" in printed
    rows = json.loads(listing.read_text())["convs"]
    assert [r["name"] for r in rows] == ["0", "2", "4"]
    assert rows[1]["flops"] == 2 * 32 * 16 * 9 * 16 * 16
    assert set(rows[1]["evbmf"]) == {"cp", "tucker", "tt"}


@pytest.mark.parametrize("content, message", [
    ("state_dict", "not a torch.nn.Module (it looks like a state_dict"),
    ("garbage", "could not load"),
    ("missing", "does not exist"),
])
def test_files_that_are_not_torch_modules(tmp_path, capsys, content, message):
    path = tmp_path / "bad.pt"
    if content == "state_dict":
        torch.save(nn.Linear(2, 2).state_dict(), path)
    elif content == "garbage":
        path.write_bytes(b"not a pickle at all")
    for command in (["inspect", str(path)], ["compress", str(path), "--out", str(tmp_path / "o")]):
        assert main(command) == 2
        assert message in capsys.readouterr().err


def test_bad_arguments_give_clear_errors(model_file, tmp_path, capsys):
    out = str(tmp_path / "o.pt")
    assert main(["compress", str(model_file), "--rank", "lots", "--out", out]) == 2
    assert "--rank: cannot read 'lots'" in capsys.readouterr().err
    assert main(["compress", str(model_file), "--rank", "0.0001", "--out", out]) == 2
    assert "rank 1" in capsys.readouterr().err
    assert main(["compress", str(model_file), "--input-shape", "1,3,a", "--out", out]) == 2
    assert "--input-shape" in capsys.readouterr().err
    assert main(["compress", str(model_file), "--include", "nothing", "--out", out]) == 2
    err = capsys.readouterr().err
    assert "warning: include pattern 'nothing' matches no convolution" in err
    assert "error: include=['nothing'] and exclude=[] leave none" in err
    assert not (tmp_path / "o.pt").exists()


def test_rank_argument_parsing():
    assert parse_rank_argument("0.25") == {"params": 0.25}
    assert parse_rank_argument("16") == 16
    assert parse_rank_argument("16,8") == (16, 8)
    assert parse_rank_argument("evbmf") == {"evbmf": 1.0}
    assert parse_rank_argument("evbmf:0.6", min_rank=4) == {"evbmf": 0.6, "min_rank": 4}
    assert parse_rank_argument("flops:0.5", global_budget=True) == {"flops": 0.5, "global": True}


def test_help_lists_both_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "compress" in printed and "inspect" in printed
    assert main([]) == 2  # no command: help, failure status
