"""The layer benchmark script runs end to end on a tiny problem and reports consistent numbers.

No timing is checked here (speed belongs to the benchmark itself); what is checked is that
every path runs, tt-conv's own FLOP formula agrees with torch's FLOP counter, the parameter
counts match the layers, and the JSON written is the table printed.
"""

import importlib.util
import json
from pathlib import Path

import pytest
import tensorly as tl

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_layers", ROOT / "benchmarks" / "layers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY = ["--in-channels", "8", "--out-channels", "6", "--size", "6", "--batch", "2",
        "--rank", "0.5", "--repeats", "2", "--warmup", "1", "--threads", "1"]


@pytest.mark.parametrize(
    "extra, n_dim",
    [
        (["--init", "random"], 2),
        (["--init", "decompose", "--channels-last"], 2),
        (["--init", "random", "--n-dim", "3", "--factorizations", "tt"], 3),
    ],
)
def test_benchmark_runs_and_counts_consistently(bench, tmp_path, capsys, extra, n_dim):
    backend = tl.get_backend()
    out = tmp_path / "nested" / "layers.json"
    payload = bench.main(TINY + extra + ["--json", str(out)])
    assert tl.get_backend() == backend

    rows = payload["rows"]
    factorizations = [f for f in ("cp", "tucker", "tt") if any(r["factorization"] == f for r in rows)]
    # dense + 2 tt-conv paths per factorization + 2 or 3 tensorly-torch paths
    expected = 1 + sum(2 + (3 if f == "cp" else 2) for f in factorizations)
    assert len(rows) == expected
    dense = rows[0]
    assert dense["path"] == "dense" and dense["params"] == 6 * 8 * 3 ** n_dim + 6
    for row in rows:
        assert row["flops_train"] > row["flops_forward"] > 0
        assert len(row["samples_ms"]["train"]) == 2
        assert row["param_ratio"] == pytest.approx(dense["params"] / row["params"])
        if row["library"] == "tt-conv":
            # tt-conv's formula is what torch.utils.flop_counter measures.
            assert row["flops_forward_own"] == row["flops_forward"]
            assert row["params"] <= 0.5 * dense["params"] + 6
    assert [g["factorization"] for g in payload["goals"]] == factorizations

    printed = capsys.readouterr().out
    assert printed.count("\n| tt-conv ") == 2 * len(factorizations)
    assert json.loads(out.read_text()) == json.loads(json.dumps(payload))


def test_benchmark_rejects_bad_arguments(bench, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--rank", "1.5"])
    assert "--rank must be a fraction in (0, 1], got 1.5" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--n-dim", "1", "--channels-last"])
    assert "--channels-last needs a 2-D or 3-D convolution" in capsys.readouterr().err
