"""benchmarks/compare_cells.py at smoke size: it trains, scores, resumes and reports."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import compare_cells  # noqa: E402


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    folder = tmp_path_factory.mktemp("compare")
    argv = ["--smoke", "--seeds", "2", "--sequences", "4", "--curve-sequences", "4",
            "--precision", "fp32", "--runs-dir", str(folder / "runs"),
            "--markdown", str(folder / "table.md"), "--figures", str(folder / "figures")]
    assert compare_cells.main(argv) == 0
    return folder, argv


def test_every_model_and_seed_is_trained_scored_and_reported(smoke):
    folder, _ = smoke
    scores = json.loads((folder / "runs" / "scores.json").read_text())
    assert sorted(scores) == sorted(f"{m}-seed{s}" for m, _, _ in compare_cells.MODELS
                                    for s in (0, 1))
    for record in scores.values():
        assert record["curve"] and record["curve"][-1][0] == 4  # validated at steps 2 and 4
        assert len(record["summary"]["metrics"]["mse"]["per_frame"]) == 30
    # The seeds differ (initial weights, sampling), so the spread is a real one.
    a, b = (scores[f"convttlstm-seed{s}"]["summary"]["metrics"]["mse"]["mean"] for s in (0, 1))
    assert a != b
    table = (folder / "table.md").read_text()
    for _, _, label in compare_cells.MODELS:
        assert f"| {label} |" in table
    assert "±" in table
    assert (folder / "figures" / "learning_curves.png").stat().st_size > 0
    assert (folder / "figures" / "per_frame.png").stat().st_size > 0


def test_a_second_start_redoes_nothing(smoke, monkeypatch):
    folder, argv = smoke
    before = (folder / "runs" / "scores.json").read_text()
    monkeypatch.setattr(compare_cells, "train", lambda *a, **k: pytest.fail("retrained"))
    assert compare_cells.main(argv) == 0
    assert (folder / "runs" / "scores.json").read_text() == before


def test_a_killed_run_continues_from_its_checkpoint(smoke, tmp_path):
    folder, argv = smoke
    runs = tmp_path / "runs"
    argv = [a if a != str(folder / "runs") else str(runs) for a in argv]
    argv = argv[:argv.index("--markdown")] + ["--models", "convttlstm", "--seeds", "1"]
    real = compare_cells.train

    def killed(config):
        # Train half the run, then "die" before the score is written.
        real(config.__class__(**{**config.__dict__, "run": config.run.__class__(
            **{**config.run.__dict__, "steps": 2})}))
        raise KeyboardInterrupt

    compare_cells.train = killed
    try:
        with pytest.raises(KeyboardInterrupt):
            compare_cells.main(argv)
    finally:
        compare_cells.train = real
    assert not (runs / "scores.json").exists()
    assert compare_cells.main(argv) == 0
    record = json.loads((runs / "scores.json").read_text())["convttlstm-seed0"]
    log = [json.loads(line) for line in (runs / "convttlstm-seed0" / "log.jsonl").read_text()
           .splitlines()]
    # One run, continued: validated at steps 2 (before the kill) and 4, each once.
    assert [r["step"] for r in log if r["kind"] == "val"] == [2, 4]
    assert record["curve"][-1][0] == 4


def test_the_matched_convlstm_has_about_conv_tt_lstms_parameters():
    import argparse

    args = argparse.Namespace(smoke=False, scale="cpu", steps=None, curve_sequences=64,
                              precision="fp32", device="cpu", runs_dir="runs")
    configs = compare_cells.model_configs(compare_cells.base_config(args))
    tt = compare_cells._parameters(configs["convttlstm"])
    matched = compare_cells._parameters(configs["convlstm-matched"])
    assert abs(matched - tt) / tt < 0.15
    assert compare_cells._parameters(configs["convlstm"]) > matched


def test_parallel_jobs_give_the_runs_one_process_gives(tmp_path):
    # --jobs 2 trains in spawned workers; with the same fixed thread count each run is the
    # same computation as in one process, and only the parent writes scores.json.
    common = ["--smoke", "--seeds", "1", "--sequences", "4", "--curve-sequences", "4",
              "--precision", "fp32", "--threads", "1", "--models", "convlstm", "convttlstm"]
    assert compare_cells.main(common + ["--runs-dir", str(tmp_path / "one")]) == 0
    assert compare_cells.main(common + ["--runs-dir", str(tmp_path / "two"), "--jobs", "2"]) == 0
    one, two = (json.loads((tmp_path / d / "scores.json").read_text()) for d in ("one", "two"))
    assert sorted(two) == ["convlstm-seed0", "convttlstm-seed0"]
    for name in one:
        assert two[name]["summary"] == one[name]["summary"]
        assert two[name]["curve"] == one[name]["curve"]
