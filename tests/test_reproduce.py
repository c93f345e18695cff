"""tools/reproduce.py, tools/paper_tables.py: planning, resuming, tables from fixture runs, docs."""

import json
import math
import os
import re
import shlex
import sys
import types

import pytest
import yaml

from tests.conftest import ROOT
from tools import paper_tables, reproduce
from tools.paper_tables import TABLES, config_key, table_keys
from tools.reproduce import main
from utils.cli import split_overrides

DOC = os.path.join(ROOT, "docs", "reproduction.md")


def _write_run(folder, metrics, dataset=None, seed=None, test_cfg=None):
    """A finished run folder as train + test leave it (only the files the table reads)."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "test_metrics.json"), "w") as f:
        json.dump({"weight": "w.pth", "num_valid_queries": 10, **metrics}, f)
    if dataset is not None:
        cfg = {"DATASETS": {"NAMES": [dataset]}, "SOLVER": {"SEED": seed}, "OUTPUT_DIR": folder}
        with open(os.path.join(folder, "config.yaml"), "w") as f:
            yaml.safe_dump(cfg, f)
    if test_cfg is not None:
        with open(os.path.join(folder, "test_config.yaml"), "w") as f:
            yaml.safe_dump(test_cfg, f)


def _row(markdown, *labels):
    start = "| " + " | ".join(labels) + " |"
    rows = [line for line in markdown.splitlines() if line.startswith(start)]
    assert len(rows) == 1, (start, rows)
    return [c.strip() for c in rows[0].strip().strip("|").split("|")]


def _section(markdown, title_start):
    parts = markdown.split("\n## ")
    found = [p for p in parts if p.startswith(title_start)]
    assert len(found) == 1
    return found[0]


# ------------------------------------------------------------------------------------------------
# Table writing
# ------------------------------------------------------------------------------------------------
def test_table2_mean_std_over_seeds_and_missing_runs(tmp_path):
    root = tmp_path / "runs"
    vit = root / "person" / "vit_clipreid" / "msmt17"
    for seed, (m, r1) in {1: (0.70, 0.85), 2: (0.72, 0.86), 3: (0.74, 0.90)}.items():
        _write_run(str(vit / f"seed{seed}"), {"mAP": m, "rank1": r1, "rank5": 0.95}, "msmt17", seed)
    # A run copied in from elsewhere: any folder name below the config's folder will do.
    _write_run(
        str(root / "person" / "cnn_base" / "from_cluster" / "a"),
        {"mAP": 0.8814, "rank1": 0.9466},
        "market1501",
        7,
    )
    out = tmp_path / "table.md"
    text = paper_tables.write_table(str(out), [TABLES["table2"]], str(root))
    assert out.read_text() == text
    lines = text.splitlines()
    header = (
        "| Backbone | Method | MSMT17 mAP / R1 | paper | Market-1501 mAP / R1 | paper | "
        "DukeMTMC-reID mAP / R1 | paper | Occluded-Duke mAP / R1 | paper |"
    )
    assert header in lines
    # By hand: mAP 70, 72, 74 -> mean 72.0, sample std sqrt((4 + 0 + 4) / 2) = 2.0;
    # R1 85, 86, 90 -> mean 87.0, sample std sqrt((4 + 1 + 9) / 2) = sqrt(7) = 2.65 -> 2.6.
    assert math.isclose(math.sqrt(7), 2.6458, rel_tol=1e-4)
    assert _row(text, "ViT-B/16", "CLIP-ReID") == [
        "ViT-B/16",
        "CLIP-ReID",
        "72.0 ± 2.0 / 87.0 ± 2.6 (3 seeds)",
        "73.4 / 88.7",
        "–",
        "89.6 / 95.5",
        "–",
        "82.5 / 90.0",
        "–",
        "59.5 / 67.1",
    ]
    # One seed: no ± ; 88.14 -> 88.1, 94.66 -> 94.7.
    assert _row(text, "CNN", "baseline")[2:6] == [
        "–",
        "60.7 / 82.1",
        "88.1 / 94.7 (1 seed)",
        "88.1 / 94.7",
    ]
    assert _row(text, "ViT-B/16", "CLIP-ReID + SIE + OLP")[2::2] == ["–"] * 4


def test_seeds_filter_and_vehicle_metrics_and_notes(tmp_path):
    root = tmp_path / "runs"
    vit = root / "person" / "vit_clipreid" / "msmt17"
    for seed, m in {1: 0.70, 2: 0.72, 3: 0.74}.items():
        _write_run(str(vit / f"seed{seed}"), {"mAP": m, "rank1": 0.9}, "msmt17", seed)
    # VehicleID shows R1 / R5; a non-standard test size and re-ranking are flagged.
    _write_run(
        str(root / "vehicleid" / "vit_clipreid" / "VehicleID" / "seed1"),
        {"mAP": 0.5, "rank1": 0.8512, "rank5": 0.9734},
        "VehicleID",
        1,
        test_cfg={"DATASETS": {"VEHICLEID_TEST_SIZE": 1600}, "TEST": {"RE_RANKING": True}},
    )
    # No config.yaml: dataset and seed come from the folder names.
    _write_run(str(root / "veri" / "vit_base" / "veri" / "seed4"), {"mAP": 0.791, "rank1": 0.957})
    res = main(
        ["--rows", "table2", "table3", "--table-only", "--root", str(root), "--seeds", "1", "3"]
    )
    text = res["markdown"]
    assert res["table"] == os.path.join(str(root), "results.md")
    assert open(res["table"]).read() == text
    # Seeds 1 and 3 only: mAP 70, 74 -> 72.0 ± sqrt(8) = 2.83 -> 2.8; R1 90, 90 -> 90.0 ± 0.0.
    table2 = _section(text, "Table 2")
    assert _row(table2, "ViT-B/16", "CLIP-ReID")[2] == "72.0 ± 2.8 / 90.0 ± 0.0 (2 seeds)"
    table3 = _section(text, "Table 3")
    assert "| Backbone | Method | VeRi-776 mAP / R1 | paper | VehicleID R1 / R5 | paper |" in table3
    assert _row(table3, "ViT-B/16", "CLIP-ReID")[4:6] == [
        "85.1 / 97.3 (1 seed; re-ranking; test size 1600)",
        "85.3 / 97.6",
    ]
    # Seed 4 is filtered out by --seeds; without the filter it shows.
    assert _row(table3, "ViT-B/16", "baseline")[2] == "–"
    text = main(["--rows", "tab3", "--table-only", "--root", str(root)])["markdown"]
    assert _row(text, "ViT-B/16", "baseline")[2:4] == ["79.1 / 95.7 (1 seed)", "79.3 / 95.7"]


def test_table_only_writes_the_table_file_for_explicit_pairs(tmp_path, capsys):
    root = tmp_path / "runs"
    _write_run(
        str(root / "person" / "ablations" / "vit_m1" / "msmt17" / "seed1234"),
        {"mAP": 0.7, "rank1": 0.8},
        "msmt17",
        1234,
    )
    out = tmp_path / "sub" / "res.md"
    res = main(
        [
            "--config",
            "configs/person/ablations/vit_m1.yml",
            "--config",
            "configs/person/vit_clipreid.yml",
            "--dataset",
            "msmt17",
            "--table-only",
            "--root",
            str(root),
            "--out",
            str(out),
        ]
    )
    assert res["table"] == str(out) and out.is_file()
    text = out.read_text()
    assert "| Config | MSMT17 mAP / R1 | paper |" in text
    # The paper gives no number for M = 1; the plain CLIP-ReID row has Table 2's.
    assert _row(text, "person/ablations/vit_m1") == [
        "person/ablations/vit_m1",
        "70.0 / 80.0 (1 seed)",
        "–",
    ]
    assert _row(text, "person/vit_clipreid") == ["person/vit_clipreid", "–", "73.4 / 88.7"]
    assert "table written to" in capsys.readouterr().out


def test_invalid_metrics_are_skipped(tmp_path):
    root = tmp_path / "runs"
    # Percentages instead of fractions: not silently tabulated as 7000 %.
    _write_run(
        str(root / "person" / "vit_base" / "msmt17" / "seed1"),
        {"mAP": 70.0, "rank1": 85.0},
        "msmt17",
        1,
    )
    runs = paper_tables.gather_runs(str(root), ["person/vit_base"])
    assert runs == {}


# ------------------------------------------------------------------------------------------------
# Planning, dry run, resuming
# ------------------------------------------------------------------------------------------------
TABLE3 = [
    ("configs/veri/cnn_base.yml", "veri", "RN50_120.pth"),
    ("configs/vehicleid/cnn_base.yml", "VehicleID", "RN50_120.pth"),
    ("configs/veri/cnn_clipreid.yml", "veri", "RN50_120.pth"),
    ("configs/vehicleid/cnn_clipreid.yml", "VehicleID", "RN50_120.pth"),
    ("configs/veri/vit_base.yml", "veri", "ViT-B-16_60.pth"),
    ("configs/vehicleid/vit_base.yml", "VehicleID", "ViT-B-16_60.pth"),
    ("configs/veri/vit_clipreid.yml", "veri", "ViT-B-16_60.pth"),
    ("configs/vehicleid/vit_clipreid.yml", "VehicleID", "ViT-B-16_60.pth"),
    ("configs/veri/vit_clipreid_sie_olp.yml", "veri", "ViT-B-16_60.pth"),
    ("configs/vehicleid/vit_clipreid_olp.yml", "VehicleID", "ViT-B-16_60.pth"),
]


def test_dry_run_lists_the_expected_commands(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    root = str(tmp_path / "runs")

    def folder(config, dataset, seed):
        sub = config[len("configs/") : -len(".yml")]
        return os.path.join(root, *sub.split("/"), dataset, f"seed{seed}")

    # Run states: finished; trained but not tested; interrupted (last.pth); the rest fresh.
    done = folder("configs/veri/cnn_base.yml", "veri", 5)
    _write_run(done, {"mAP": 0.8, "rank1": 0.9}, "veri", 5)
    trained = folder("configs/veri/vit_base.yml", "veri", 6)
    os.makedirs(trained)
    open(os.path.join(trained, "ViT-B-16_60.pth"), "w").close()
    interrupted = folder("configs/vehicleid/vit_clipreid.yml", "VehicleID", 5)
    os.makedirs(interrupted)
    open(os.path.join(interrupted, "last.pth"), "w").close()

    argv = ["--rows", "table3", "--dry-run", "--root", root, "--seeds", "5", "6"]
    res = main([*argv, "--dataset-root", "data dir", "TEST.RE_RANKING", "True"])
    expected = []
    for config, dataset, weights in TABLE3:
        for seed in (5, 6):
            out = folder(config, dataset, seed)
            common = ["--config-file", config, "DATASETS.NAMES", dataset]
            common += ["DATASETS.ROOT_DIR", "data dir", "SOLVER.SEED", str(seed), "OUTPUT_DIR", out]
            if out == done:
                continue
            if out != trained:
                resume = ["SOLVER.RESUME", "auto"] if out == interrupted else []
                train = ["python", "train_clipreid.py", *common, *resume, "TEST.RE_RANKING", "True"]
                expected.append(shlex.join(train))
            test = ["python", "test_clipreid.py", *common, "TEST.WEIGHT"]
            test += [os.path.join(out, weights), "TEST.RE_RANKING", "True"]
            expected.append(shlex.join(test))
    assert res["commands"] == expected
    assert len(expected) == 2 * 20 - 2 - 1
    assert res["done"] == [done] and len(res["runs"]) == 20
    printed = capsys.readouterr().out.splitlines()
    assert printed == [f"# done: {done}" if line == "#" else line for line in _interleave(expected)]
    # Nothing was written by a dry run.
    assert not os.path.exists(os.path.join(root, "results.md"))


def _interleave(commands):
    """Printed order: the done marker comes where the finished run's commands would be."""
    out = list(commands)
    out.insert(0, "#")  # veri/cnn_base seed 5 is the first run of Table 3
    return out


def test_dataset_filter_config_default_dataset_and_seed(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    root = str(tmp_path)
    res = main(["--rows", "table2", "--dataset", "market1501", "--dry-run", "--root", root])
    # 5 rows x 1 column, the configs' own seed 1234; train + test each.
    assert len(res["runs"]) == 5 and len(res["commands"]) == 10
    assert all(r.endswith(os.path.join("market1501", "seed1234")) for r in res["runs"])
    res = main(["--config", "configs/veri/vit_clipreid.yml", "--dry-run", "--root", root])
    assert res["runs"] == [os.path.join(root, "veri", "vit_clipreid", "veri", "seed1234")]
    # One config on several datasets.
    argv = ["--config", "configs/person/vit_base.yml", "--dataset", "msmt17", "occ_duke"]
    res = main([*argv, "--dry-run", "--root", root, "--seeds", "9"])
    assert res["runs"] == [
        os.path.join(root, "person", "vit_base", d, "seed9") for d in ("msmt17", "occ_duke")
    ]
    with pytest.raises(ValueError, match="2 configs but 3 datasets"):
        main(["--config", "a.yml", "b.yml", "--dataset", "x", "y", "z", "--dry-run"])
    with pytest.raises(ValueError, match="none of the selected tables"):
        main(["--rows", "table3", "--dataset", "msmt17", "--dry-run"])


def test_all_rows_are_unique_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    res = main(["--rows", "all", "--dry-run", "--root", str(tmp_path)])
    # Table 2: 20, Table 3: 10, Table 5: +2 one-stage, Table 6: +3, Table 7: +3,
    # Table 8: +2 (average on MSMT17 and Market), tokens: +2, PCL-CLIP: +6 (2 rows x 3 datasets).
    # Shared runs are planned once.
    assert len(res["runs"]) == len(set(res["runs"])) == 48


def test_runs_train_then_test_and_resume(tmp_path, monkeypatch):
    """The run loop with stand-in entry points: skips, test-only runs, failures, the table."""
    monkeypatch.chdir(ROOT)
    root = str(tmp_path / "runs")
    calls = []

    def _opt(argv, key):
        return argv[argv.index(key) + 1]

    def fake_train(argv):
        out, seed = _opt(argv, "OUTPUT_DIR"), int(_opt(argv, "SOLVER.SEED"))
        calls.append(("train", seed))
        if seed == 3:
            raise RuntimeError("out of memory")
        os.makedirs(out, exist_ok=True)
        cfg = {"DATASETS": {"NAMES": [_opt(argv, "DATASETS.NAMES")]}, "SOLVER": {"SEED": seed}}
        with open(os.path.join(out, "config.yaml"), "w") as f:
            yaml.safe_dump(cfg, f)
        open(os.path.join(out, "ViT-B-16_60.pth"), "w").close()

    def fake_test(argv):
        out, seed = _opt(argv, "OUTPUT_DIR"), int(_opt(argv, "SOLVER.SEED"))
        assert _opt(argv, "TEST.WEIGHT") == os.path.join(out, "ViT-B-16_60.pth")
        calls.append(("test", seed))
        with open(os.path.join(out, "test_metrics.json"), "w") as f:
            json.dump({"mAP": 0.5 + seed / 100, "rank1": 0.8}, f)

    monkeypatch.setitem(sys.modules, "train_clipreid", types.SimpleNamespace(main=fake_train))
    monkeypatch.setitem(sys.modules, "test_clipreid", types.SimpleNamespace(main=fake_test))
    monkeypatch.setattr(reproduce, "_restore_logging", lambda: None)
    seed2 = os.path.join(root, "person", "vit_clipreid", "market1501", "seed2")
    os.makedirs(seed2)
    open(os.path.join(seed2, "ViT-B-16_60.pth"), "w").close()
    with open(os.path.join(seed2, "config.yaml"), "w") as f:
        yaml.safe_dump({"DATASETS": {"NAMES": ["market1501"]}, "SOLVER": {"SEED": 2}}, f)
    argv = ["--config", "configs/person/vit_clipreid.yml", "--dataset", "market1501"]
    argv += ["--root", root, "--seeds", "1", "2", "3"]
    res = main(argv)
    assert calls == [("train", 1), ("test", 1), ("test", 2), ("train", 3)]
    assert res["failed"] == [os.path.join(root, "person", "vit_clipreid", "market1501", "seed3")]
    # Seeds 1 and 2 finished: mAP 51, 52 -> 51.5 ± 0.7 (sqrt(0.5) = 0.707).
    row = _row(res["markdown"], "person/vit_clipreid")
    assert row[1:] == ["51.5 ± 0.7 / 80.0 ± 0.0 (2 seeds)", "89.6 / 95.5"]
    calls.clear()
    res = main(argv)  # again: only the failed run is retried
    assert calls == [("train", 3)] and len(res["done"]) == 2


# ------------------------------------------------------------------------------------------------
# Small pieces
# ------------------------------------------------------------------------------------------------
def test_table_keys_and_aliases():
    assert table_keys(["tab5", "table2"]) == ["table2", "table5"]
    assert table_keys(["all"]) == list(TABLES)
    assert table_keys(["table3,tokens"]) == ["table3", "tokens"]
    with pytest.raises(ValueError, match="table2"):
        table_keys(["table4"])


def test_split_overrides_and_reserved_keys():
    args, opts = split_overrides(["--rows", "table2", "MODEL.AMP_DTYPE", "bf16", "--seeds", "1"])
    assert args == ["--rows", "table2", "--seeds", "1"] and opts == ["MODEL.AMP_DTYPE", "bf16"]
    args, opts = split_overrides(["--out", "RESULTS.MD", "--", "TEST.MAX_RANK", "-1"])
    assert args == ["--out", "RESULTS.MD"] and opts == ["TEST.MAX_RANK", "-1"]
    with pytest.raises(ValueError, match="SOLVER.SEED"):
        main(["--rows", "table2", "--dry-run", "SOLVER.SEED", "3"])


def test_config_key():
    assert config_key("configs/person/vit_clipreid.yml") == "person/vit_clipreid"
    assert config_key("./configs/person/ablations/vit_m1.yml") == "person/ablations/vit_m1"
    assert config_key(os.path.join(ROOT, "configs", "veri", "vit_base.yml")) == "veri/vit_base"
    assert config_key("somewhere/official_configs/veri/vit_prom.yml") == "vit_prom"


# ------------------------------------------------------------------------------------------------
# The reproduction guide
# ------------------------------------------------------------------------------------------------
def test_every_config_named_in_the_docs_exists():
    text = open(DOC, encoding="utf-8").read()
    named = set(re.findall(r"configs/[\w./-]+?\.ya?ml", text))
    assert len(named) >= 26
    missing = [p for p in sorted(named) if not os.path.isfile(os.path.join(ROOT, p))]
    assert missing == []


def test_docs_give_every_registry_run_and_paper_number():
    text = open(DOC, encoding="utf-8").read()
    for table in TABLES.values():
        for row in table.rows:
            for col, cell in zip(table.columns, row.cells, strict=True):
                if cell is None:
                    continue
                assert cell.config in text
                assert f"DATASETS.NAMES {col.dataset}" in text
                if cell.paper is not None:
                    assert f"{cell.paper[0]:.1f} / {cell.paper[1]:.1f}" in text


def test_docs_commands_are_the_tools_commands(monkeypatch):
    """The hand commands of the guide are exactly what the tool runs (root runs, data in data)."""
    monkeypatch.chdir(ROOT)
    text = open(DOC, encoding="utf-8").read()
    documented = [
        line for line in text.splitlines() if line.startswith(("python train_", "python test_"))
    ]
    planned = set()
    for table in TABLES.values():
        for row in table.rows:
            for col, cell in zip(table.columns, row.cells, strict=True):
                if cell is not None:
                    run = reproduce.plan_run(cell.config, col.dataset, None, "runs", "data", [])
                    planned.add(shlex.join(["python", "train_clipreid.py", *run.train_argv]))
                    planned.add(shlex.join(["python", "test_clipreid.py", *run.test_argv]))
    # Every run once (a shared run is listed where it first appears), nothing else.
    assert len(documented) == len(set(documented)) == len(planned) == 2 * 48
    assert set(documented) == planned


def test_pcl_rows_plan_six_runs_with_the_papers_known_numbers(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    res = main(["--rows", "pcl", "--dry-run", "--root", str(tmp_path), "--dataset-root", "data"])
    expected = [
        os.path.join(str(tmp_path), *cfg.split("/"), dataset, "seed1234")
        for cfg in ("person/vit_pcl", "person/vit_pcl_noid")
        for dataset in ("msmt17", "market1501")
    ]
    expected[2:2] = [os.path.join(str(tmp_path), "veri", "vit_pcl", "veri", "seed1234")]
    expected.append(os.path.join(str(tmp_path), "veri", "vit_pcl_noid", "veri", "seed1234"))
    assert res["runs"] == expected
    _write_run(
        str(tmp_path / "person" / "vit_pcl" / "market1501" / "seed1234"),
        {"mAP": 0.9131, "rank1": 0.9581},
        "market1501",
        1234,
    )
    text = main(["--rows", "pcl", "--table-only", "--root", str(tmp_path)])["markdown"]
    assert _row(text, "PCL + 0.25 ID (PCL-CLIP)")[1:] == [
        "–",
        "76.1 / 89.8",
        "91.3 / 95.8 (1 seed)",  # 91.31 -> 91.3, 95.81 -> 95.8
        "91.4 / 95.9",
        "–",
        "82.5 / 97.1",
    ]
    assert _row(text, "PCL only")[1:] == ["–"] * 6  # the PCL-only numbers are unknown
