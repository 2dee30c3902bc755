"""The ``tt-conv`` command line: compress and inspect saved models, and its error messages."""

import json
import os
import stat
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
    code = main(["compress", str(model_file), "--trust-pickle", "--rank", "0.25", "--factorization", "tucker",
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
    assert main(["compress", str(model_file), "--trust-pickle", "--rank", "energy:0.9", "--factorization", "cp",
                 "--out", str(out), "--report", str(report), "--export", "--quiet"]) == 0
    assert json.loads(report.read_text())["rank"] == "0.9 of the spectral energy"
    script = ("import sys; sys.modules['tt_conv'] = None\nimport torch\n"
              f"m = torch.load({str(out)!r}, weights_only=False)\n"
              "print(m(torch.randn(1, 3, 8, 8)).shape)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120)
    assert result.stdout.strip() == "torch.Size([1, 4])", result.stderr


def test_compress_exports_the_chains_as_executed(tmp_path, capsys):
    # A Tucker 1 x 1 layer runs as two convolutions (its three 1 x 1 stages, two merged):
    # --export keeps the three, --export-as-executed saves the two; same outputs.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 1))
    path = tmp_path / "m.pt"
    torch.save(model, path)
    saved = {}
    for flag in ("--export", "--export-as-executed"):
        out = tmp_path / f"{flag.strip('-')}.pt"
        assert main(["compress", str(path), "--trust-pickle", "--factorization", "tucker",
                     "--rank", "0.5", "--include", "2", "--out", str(out), flag]) == 0
        assert f"saved plain PyTorch model to {out}" in capsys.readouterr().out
        saved[flag] = torch.load(out, weights_only=False)
    convs = {flag: sum(isinstance(m, nn.Conv2d) for m in saved[flag][2].modules())
             for flag in saved}
    assert convs == {"--export": 3, "--export-as-executed": 2}
    assert not any(type(m).__module__.startswith("tt_conv") for m in saved["--export-as-executed"].modules())
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(saved["--export-as-executed"](x), saved["--export"](x),
                                   rtol=1e-4, atol=1e-5)


def test_compress_can_retain_freed_memory_before_timing(model_file, tmp_path, monkeypatch,
                                                       capsys):
    # The setting is process-wide and permanent: the test process keeps glibc's default,
    # and the command is checked to ask for it before compressing, and to report a refusal.
    import tt_conv.cli as cli

    calls = []
    monkeypatch.setattr(cli, "retain_freed_memory", lambda: calls.append("retained"))
    out = tmp_path / "small.pt"
    assert main(["compress", str(model_file), "--trust-pickle", "--rank", "0.5", "--out",
                 str(out), "--retain-freed-memory", "--quiet"]) == 0
    assert calls == ["retained"] and out.exists()

    def refuse():
        raise RuntimeError("retain_freed_memory needs glibc's mallopt")

    monkeypatch.setattr(cli, "retain_freed_memory", refuse)
    assert main(["compress", str(model_file), "--trust-pickle", "--rank", "0.5", "--out",
                 str(tmp_path / "other.pt"), "--retain-freed-memory", "--quiet"]) == 2
    assert "error: --retain-freed-memory: retain_freed_memory needs glibc's mallopt" in \
        capsys.readouterr().err


def test_compress_can_fold_batch_norms_for_inference(tmp_path, capsys):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 8, 1), nn.BatchNorm2d(8))
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[4].running_var.uniform_(0.5, 2)
    path, out, plain = tmp_path / "bn.pt", tmp_path / "folded.pt", tmp_path / "plain.pt"
    torch.save(model, path)  # in training mode, as trained: the command folds in eval mode
    assert main(["compress", str(path), "--trust-pickle", "--rank", "0.5", "--out", str(out),
                 "--fold-batch-norms", "--export"]) == 0
    assert "2 batch norm(s) folded" in capsys.readouterr().out
    assert main(["compress", str(path), "--trust-pickle", "--rank", "0.5", "--out", str(plain),
                 "--quiet"]) == 0
    folded = torch.load(out, weights_only=False)
    assert not folded.training
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    unfolded = torch.load(plain, weights_only=False).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        reference = unfolded(x)
        assert float((folded(x) - reference).norm() / reference.norm()) < 1e-5


def test_compress_with_calibration_and_global_budget(model_file, tmp_path, capsys):
    batch = tmp_path / "batch.pt"
    torch.save(torch.randn(8, 3, 16, 16), batch)
    out = tmp_path / "small.pt"
    assert main(["compress", str(model_file), "--trust-pickle", "--rank", "params:0.3", "--global",
                 "--factorization", "auto", "--calibration", str(batch), "--out", str(out),
                 "--exclude", "0"]) == 0
    printed = capsys.readouterr().out
    assert "shared energy threshold" in printed and "output error" in printed
    assert "0: not selected" in printed


def test_inspect_lists_convolutions_and_savings(model_file, tmp_path, capsys):
    listing = tmp_path / "inspect.json"
    assert main(["inspect", str(model_file), "--trust-pickle", "--input-shape", "1,3,16,16", "--json",
                 str(listing)]) == 0
    printed = capsys.readouterr().out
    assert "tucker (EVBMF)" in printed and "32x16x3x3" in printed and "EVBMF cp:" in printed
    rows = json.loads(listing.read_text())["convs"]
    assert [r["name"] for r in rows] == ["0", "2", "4"]
    assert rows[1]["flops"] == 2 * 32 * 16 * 9 * 16 * 16
    assert set(rows[1]["evbmf"]) == {"cp", "tucker", "tt"}


@pytest.mark.parametrize("content, message", [
    ("state_dict", "holds a state_dict (4 tensors): name the architecture it belongs to with --arch"),
    ("garbage", "is not a torch.save file"),
    ("empty", "is empty (0 bytes)"),
    ("missing", "does not exist"),
    ("tensor", "holds a Tensor, neither a state_dict nor a checkpoint"),
])
def test_files_that_are_not_torch_modules(tmp_path, capsys, content, message):
    path = tmp_path / "bad.pt"
    if content == "state_dict":
        torch.save(nn.Linear(2, 2).state_dict() | {"extra.weight": torch.zeros(1),
                                                   "extra.bias": torch.zeros(1)}, path)
    elif content == "garbage":
        path.write_bytes(bytes(range(256)) * 4)
    elif content == "empty":
        path.write_bytes(b"")
    elif content == "tensor":
        torch.save(torch.zeros(3), path)
    for command in (["inspect", str(path)], ["compress", str(path), "--out", str(tmp_path / "o")]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert message in err
        # Never torch's advice to retry with weights_only=False (it runs the file's code).
        assert "weights_only" not in err and "Traceback" not in err


class _MarkerPayload:
    """Unpickling this calls ``open(marker, 'w')``: the proof that a file ran code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


@pytest.mark.parametrize("payload", ["in_model", "alone", "plain_pickle"])
def test_a_code_running_pickle_does_not_run_without_trust_pickle(tmp_path, capsys, payload):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    evil = _MarkerPayload(marker)
    if payload == "in_model":
        model = nn.Sequential(nn.Conv2d(3, 8, 3))
        model.payload = evil  # a model that carries the payload along
        torch.save(model, path)
    elif payload == "alone":
        torch.save({"state_dict": {"w": torch.zeros(2)}, "x": evil}, path)
    else:
        import pickle

        path.write_bytes(pickle.dumps(evil, protocol=4))
    for command in (["inspect", str(path)],
                    ["compress", str(path), "--out", str(tmp_path / "o.pt")],
                    ["inspect", str(path), "--arch", "torchvision:alexnet"]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert "run code" in err and "--trust-pickle" in err and "builtins.exec" in err
        assert not marker.exists(), f"{command} ran code from the file"
    assert not (tmp_path / "o.pt").exists()
    # The flag does what it says (so the payload is real): the file's code runs.
    main(["inspect", str(path), "--trust-pickle"])
    assert marker.read_text() == "ran"


def test_trust_pickle_help_says_it_runs_code(capsys):
    for command in ("compress", "inspect"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "--trust-pickle" in text and "RUNS CODE FROM THE FILE" in text
        assert "--arch" in text


def small_cnn() -> nn.Module:
    """An --arch builder (``test_cli:small_cnn``): the fixture's architecture."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 32, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 4),
    )


@pytest.mark.parametrize("wrap", ["bare", "checkpoint", "ddp"])
def test_state_dicts_and_checkpoints_load_with_arch_without_trust(model_file, tmp_path, capsys,
                                                                    wrap):
    trusted = torch.load(model_file, weights_only=False)
    state = trusted.state_dict()
    if wrap == "checkpoint":
        state = {"model_state_dict": state, "epoch": 3}
    elif wrap == "ddp":
        state = {f"module.{k}": v for k, v in state.items()}
    path = tmp_path / "weights.pt"
    torch.save(state, path)
    out = tmp_path / "small.pt"
    assert main(["compress", str(path), "--arch", "test_cli:small_cnn", "--rank", "0.5",
                 "--out", str(out), "--quiet"]) == 0
    compressed = torch.load(out, weights_only=False)
    assert isinstance(compressed[2], FactorizedConv)
    assert main(["inspect", str(path), "--arch", "test_cli:small_cnn", "--quiet"]) == 0
    assert "3 convolutions" in capsys.readouterr().out
    assert main(["inspect", str(path), "--arch", "torchvision:resnet18"]) == 2
    assert "does not fit --arch torchvision:resnet18: missing conv1.weight" in \
        capsys.readouterr().err
    assert main(["inspect", str(path), "--arch", "timm:no_such_net_xyz"]) == 2
    assert "--arch 'timm:no_such_net_xyz': no such model" in capsys.readouterr().err


def test_compress_refuses_to_replace_its_input_and_respects_the_umask(model_file, tmp_path,
                                                                      capsys):
    before = model_file.read_bytes()
    assert main(["compress", str(model_file), "--trust-pickle", "--out", str(model_file),
                 "--quiet"]) == 2
    assert "is the input model file" in capsys.readouterr().err
    assert model_file.read_bytes() == before
    assert main(["compress", str(model_file), "--trust-pickle", "--out", str(tmp_path / "a.pt"),
                 "--report", str(tmp_path / "a.pt"), "--quiet"]) == 2
    assert "two outputs" in capsys.readouterr().err
    old = os.umask(0o022)
    try:
        assert main(["compress", str(model_file), "--trust-pickle", "--out", str(model_file),
                     "--force", "--report", str(tmp_path / "r.md"), "--quiet"]) == 0
        assert stat.S_IMODE(os.stat(model_file).st_mode) == 0o644
        assert stat.S_IMODE(os.stat(tmp_path / "r.md").st_mode) == 0o644
        os.umask(0o027)
        assert main(["compress", str(model_file), "--trust-pickle", "--out",
                     str(tmp_path / "b.pt"), "--quiet"]) == 0
        assert stat.S_IMODE(os.stat(tmp_path / "b.pt").st_mode) == 0o640
    finally:
        os.umask(old)
    assert isinstance(torch.load(model_file, weights_only=False)[2], FactorizedConv)


def test_nan_calibration_and_lazy_convolutions(model_file, tmp_path, capsys):
    batch = tmp_path / "nan.pt"
    values = torch.randn(4, 3, 16, 16)
    values[1, 0, 2, 2] = float("nan")
    torch.save(values, batch)
    assert main(["compress", str(model_file), "--trust-pickle", "--calibration", str(batch),
                 "--out", str(tmp_path / "o.pt"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "calibration batch holds 1 NaN or inf value(s)" in err and "Traceback" not in err
    lazy = tmp_path / "lazy.pt"
    torch.save(nn.Sequential(nn.LazyConv2d(8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3)), lazy)
    assert main(["inspect", str(lazy), "--trust-pickle", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "layer '0' (LazyConv2d) is an uninitialised lazy convolution" in captured.err
    assert main(["inspect", str(lazy), "--trust-pickle", "--input-shape", "1,3,16,16",
                 "--quiet"]) == 0
    assert "2 convolutions" in capsys.readouterr().out


def test_rank_one_is_reported_as_a_budget_not_full_rank(model_file, tmp_path, capsys):
    assert main(["compress", str(model_file), "--trust-pickle", "--rank", "1.0",
                 "--out", str(tmp_path / "o.pt")]) == 0
    assert "a budget of the dense size, not full rank" in capsys.readouterr().out


def test_bad_arguments_give_clear_errors(model_file, tmp_path, capsys):
    out = str(tmp_path / "o.pt")
    assert main(["compress", str(model_file), "--trust-pickle", "--rank", "lots", "--out", out]) == 2
    assert "--rank: cannot read 'lots'" in capsys.readouterr().err
    assert main(["compress", str(model_file), "--trust-pickle", "--rank", "0.0001", "--out", out]) == 2
    assert "rank 1" in capsys.readouterr().err
    assert main(["compress", str(model_file), "--trust-pickle", "--input-shape", "1,3,a", "--out", out]) == 2
    assert "--input-shape" in capsys.readouterr().err
    assert main(["compress", str(model_file), "--trust-pickle", "--include", "nothing", "--out", out]) == 2
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
