"""Cross-domain calibration tables: perplexity grids, mask overlap, the stage's outputs."""

import csv
import io
import json

import numpy as np
import pytest
import yaml

from fnprune import config as C
from fnprune import domains as D
from helpers import mask_for


def ppl_record(model, corpus, ppl, ratio=20, method="c16", calibration=None, weights="tiny"):
    dense = method == "dense"
    return {
        "target": f"{model}_dense" if dense else f"{model}_r{ratio}_{method}",
        "model": model,
        "weights": weights,
        "dense": dense,
        "ratio": None if dense else ratio,
        "method": method,
        "corpus": corpus,
        "calibration_corpus": None if dense else calibration,
        "results": [{"protocol": "flap_token_ppl", "seqlen": 128, "ppl": ppl, "windows": 10}],
    }


RECORDS = [
    ppl_record("tiny", "langref", 100.0, method="dense"),
    ppl_record("tiny", "libdocs", 200.0, method="dense"),
    ppl_record("tiny_langref", "langref", 110.0, calibration="langref"),
    ppl_record("tiny_langref", "libdocs", 260.0, calibration="langref"),
    ppl_record("tiny_libdocs", "langref", 130.0, calibration="libdocs"),
    ppl_record("tiny_libdocs", "libdocs", 220.0, calibration="libdocs"),
]


def mask(kept, sizes=(4, 4, 4), prunable=(False, True, True)):
    return mask_for(kept, sizes, prunable)


def test_grid_rows_are_dense_then_sources_and_columns_corpora():
    (g,) = D.perplexity_grids(RECORDS)
    assert (g.ratio, g.method, g.protocol) == (20, "c16", "flap_token_ppl@128")
    assert g.rows == ["tiny (dense)", "tiny_langref", "tiny_libdocs"]
    assert g.calibration == [None, "langref", "libdocs"] and g.corpora == ["langref", "libdocs"]
    np.testing.assert_allclose(g.ppl, [[100, 200], [110, 260], [130, 220]])
    np.testing.assert_allclose(g.change, [[0, 0], [10, 30], [30, 10]])


def test_missing_cell_is_nan_and_one_grid_per_method():
    recs = RECORDS[:-1] + [ppl_record("tiny_langref", "langref", 120.0, method="wanda_sp", calibration="langref")]
    grids = D.perplexity_grids(recs)
    assert [g.method for g in grids] == ["c16", "wanda_sp"]
    assert np.isnan(grids[0].ppl[2, 1])
    assert grids[1].rows == grids[0].rows and np.isnan(grids[1].ppl[1, 1]) and np.isnan(grids[1].ppl[2]).all()


def test_grids_need_one_dense_model_of_one_weights():
    with pytest.raises(ValueError, match="no dense record"):
        D.perplexity_grids(RECORDS[2:])
    with pytest.raises(ValueError, match="several models' weights"):
        D.perplexity_grids(RECORDS + [ppl_record("micro", "langref", 1.0, weights="micro")])


def test_markdown_bolds_the_best_source_per_domain():
    (g,) = D.perplexity_grids(RECORDS)
    lines = D.grid_markdown(g).splitlines()
    assert lines[2] == "| tiny (dense) | - | 100.00 | 200.00 |"
    assert lines[3] == "| tiny_langref | langref | **110.00 (+10.0%)** | 260.00 (+30.0%) |"
    assert lines[4] == "| tiny_libdocs | libdocs | 130.00 (+30.0%) | **220.00 (+10.0%)** |"


def test_overlap_is_dice_over_prunable_layers_with_its_chance_level():
    a = mask([[0, 1, 2, 3], [0, 1], [0, 1, 2]])
    b = mask([[0], [0, 2], [0, 1, 3]])
    o = D.mask_overlap(a, b)
    # prunable layers 1 and 2: |A| = 5, |B| = 5, |A & B| = 1 + 2
    assert o["dice"] == pytest.approx(2 * 3 / 10)
    assert o["chance"] == pytest.approx(2 * (2 * 2 / 4 + 3 * 3 / 4) / 10)
    assert (o["kept_a"], o["kept_b"], o["neurons"]) == (5, 5, 8)
    assert D.mask_overlap(a, a)["dice"] == 1.0


def test_overlap_rows_pair_sources_per_ratio_and_method():
    m = mask([[0], [0, 1], [2]])
    rows = D.overlap_rows([("a", 20, "c16", m), ("b", 20, "c16", m), ("c", 20, "c16", m), ("a", 30, "c16", m)])
    assert [(r["source_a"], r["source_b"]) for r in rows] == [("a", "b"), ("a", "c"), ("b", "c")]


def test_stage_writes_tables_and_figure(tmp_path):
    files = []
    for i, r in enumerate(RECORDS):
        files.append(tmp_path / f"ppl{i}.json")
        files[-1].write_text(json.dumps(r))
    masks = [tmp_path / "m0.json", tmp_path / "m1.json"]
    masks[0].write_text(json.dumps(mask([[0], [0, 1], [2]])))
    masks[1].write_text(json.dumps(mask([[0], [0, 2], [2]])))
    keys = [
        {"source": "tiny_langref", "ratio": 20, "method": "c16"},
        {"source": "tiny_libdocs", "ratio": 20, "method": "c16"},
    ]
    out = {k: tmp_path / "out" / f"tiny_domains{k}" for k in (".md", ".csv", "_overlap.csv", ".png")}
    D.table(
        "tiny",
        [str(f) for f in files],
        [str(m) for m in masks],
        keys,
        out[".md"],
        out[".csv"],
        out["_overlap.csv"],
        out[".png"],
    )
    md = out[".md"].read_text()
    assert (
        "# Cross-domain calibration: tiny" in md
        and "| 20% | ICA k=16 | tiny_langref | tiny_libdocs | 0.667 | 0.417 |" in md
    )
    assert "![perplexity heatmap](tiny_domains.png)" in md
    rows = list(csv.DictReader(io.StringIO(out[".csv"].read_text())))
    assert len(rows) == 6 and {r["eval_corpus"] for r in rows} == {"langref", "libdocs"}
    assert float(
        next(r for r in rows if r["source"] == "tiny_libdocs" and r["eval_corpus"] == "libdocs")["change_pct"]
    ) == pytest.approx(10.0)
    (ov,) = csv.DictReader(io.StringIO(out["_overlap.csv"].read_text()))
    assert float(ov["dice"]) == pytest.approx(2 / 3)
    assert out[".png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="2 mask files but 1 mask keys"):
        D.table("tiny", [str(f) for f in files], [str(m) for m in masks], keys[:1], *out.values())


def test_ppl_fields_and_points_of_the_shipped_config():
    cfg = yaml.safe_load(open("config/config.yaml"))
    cfg.update(yaml.safe_load(open("config/tiny.yaml")))  # the toy's domains
    cfg = C.validate(cfg)
    assert D.bases(cfg) == ["tiny"]
    points = D.pruned_points(cfg, "tiny")
    assert points[:2] == [("tiny", 20, "c16"), ("tiny", 20, "wanda_sp")]
    assert {p[0] for p in points} == set(cfg["domains"]["models"])
    f = D.ppl_fields(cfg, "tiny_langref_r20_c16", "libdocs")
    assert f == {
        "target": "tiny_langref_r20_c16",
        "model": "tiny_langref",
        "weights": "tiny",
        "dense": False,
        "ratio": 20,
        "method": "c16",
        "corpus": "libdocs",
        "calibration_corpus": "langref",
    }
    assert D.ppl_fields(cfg, "tiny_dense", "stdlib")["calibration_corpus"] is None


def test_the_default_domains_compare_code_and_documentation_on_smol():
    cfg = C.validate(yaml.safe_load(open("config/config.yaml")))
    assert D.bases(cfg) == ["smol"] and cfg["domains"]["corpora"] == ["stdlib_docs", "stdlib_code"]
    f = D.ppl_fields(cfg, "smol_code_r20_c64", "stdlib_docs")
    assert f["calibration_corpus"] == "stdlib_code" and f["corpus"] == "stdlib_docs" and f["weights"] == "smol"


def _with_windows(record, nll):
    r = json.loads(json.dumps(record))
    r["results"][0]["window_nll"] = nll
    return r


def test_paired_cells_give_ratios_to_dense_and_to_the_best_source_over_the_same_windows():
    rng = np.random.default_rng(0)
    base = rng.normal(4.0, 0.5, size=50)
    shift = {0: 0.0, 2: 0.10, 3: 0.30, 4: 0.30, 5: 0.10}  # langref: langref-calibrated best; libdocs: libdocs
    recs = [_with_windows(r, list(base + shift.get(i, 0.0) + rng.normal(0, 0.01, 50))) for i, r in enumerate(RECORDS)]
    (g,) = D.perplexity_grids(recs)
    cells = D.paired_cells(g)
    lr, ld = cells  # rows tiny_langref, tiny_libdocs; columns langref, libdocs
    assert lr[0]["vs_best"] is None and lr[0]["best"] == "tiny_langref"
    assert ld[1]["vs_best"] is None and ld[1]["best"] == "tiny_libdocs"
    ratio, lo, hi = ld[0]["vs_best"]  # libdocs mask on langref: exp(0.2) x the langref mask's perplexity
    assert lo < ratio < hi and lo > 1.0 and ratio == pytest.approx(np.exp(0.2), rel=0.01)
    assert lr[0]["vs_dense"][0] == pytest.approx(np.exp(0.1), rel=0.01)
    md = D.paired_markdown(g)
    assert md.splitlines()[2].startswith("| tiny_langref | langref | ") and "| best |" in md.splitlines()[2]
    rows = list(csv.DictReader(io.StringIO(D.grids_csv([g]))))
    cell = next(r for r in rows if r["source"] == "tiny_libdocs" and r["eval_corpus"] == "langref")
    assert float(cell["x_best"]) == pytest.approx(ratio) and float(cell["x_best_lo"]) > 1.0


def test_no_paired_table_without_window_nll():
    (g,) = D.perplexity_grids(RECORDS)
    assert D.paired_markdown(g) is None
    assert all(c is None for row in D.paired_cells(g) for c in row)
