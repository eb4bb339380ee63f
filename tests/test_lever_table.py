"""The compare report's answer for the lever (synthetic sets mixed into the batches vs none), per budget, with the
2-std verdict of the noise rule."""
import dataclasses

from synthvit.compare.report import Report
from synthvit.compare.results import COLUMNS, Row
from synthvit.compare.tables import lever_table


def _row(name: str, synthetic: str, budget: int, seed: int, ap: float, auroc: float, ratio: float) -> Row:
    values = dict.fromkeys(COLUMNS)
    values.update(name=name, model="vit_tiny_patch16_224", family="vit", init="", weights="random",
                  synthetic=synthetic, decoder="dpt-skip", task="seg", budget=budget, seed=seed, status="done",
                  pixel_ap=ap, image_auroc=auroc, defect_iou=ap / 2, defect_pixel_ratio=ratio, folder="x")
    return Row(**values)


def test_lever_table_gives_one_row_per_budget_with_the_verdict_word():
    rows = []
    for seed, jitter in enumerate((-0.01, 0.0, 0.01)):
        rows += [_row("vit-scratch", "", 5, seed, 0.15 + jitter, 0.80 + jitter, 0.3),
                 _row("vit-copypaste", "copypaste", 5, seed, 0.30 + jitter, 0.81 - jitter, 0.9),  # AP clearly up
                 _row("vit-scratch", "", 20, seed, 0.30 + jitter, 0.90, 1.0),
                 _row("vit-copypaste", "copypaste", 20, seed, 0.29 - jitter, 0.90, 1.1)]  # noise
    rows.append(_row("vit-copypaste", "copypaste", 50, 0, 0.4, 0.9, 1.0))  # no real-only row at 50: no line
    rows.append(_row("vit-scratch", "", 80, 0, 0.4, 0.9, 1.0))
    rows.append(_row("vit-copypaste", "copypaste", 80, 0, 0.5, 0.9, 1.0))  # one seed each: no verdict
    table = lever_table(rows, "defective train images")
    body = {r[2]: dict(zip(table.header, r)) for r in table.rows}
    assert sorted(body) == [5, 20, 80] and body[5]["mixed"] == "vit-copypaste" and body[5]["real only"] == "vit-scratch"
    assert body[5]["pixel AP verdict"] == "better" and body[5]["pixel AP diff (2 std)"].startswith("+0.1500")
    assert body[5]["image AUROC verdict"] == "within noise" and body[20]["pixel AP verdict"] == "within noise"
    assert body[80]["pixel AP verdict"] == "one seed: no verdict" and body[5]["seeds"] == "3 vs 3"
    assert body[5]["pred/true px mixed"].mean == 0.9 and body[5]["pred/true px real only"].mean == 0.3
    report = Report("t")
    report.add("table", table)
    assert "| vit-copypaste | vit-scratch | 5 | 3 vs 3 |" in report.markdown()
    worse = [dataclasses.replace(r, pixel_ap=0.0 + r.seed * 0.001) if r.synthetic and r.budget == 5 else r for r in rows]
    assert {r[2]: dict(zip(table.header, r)) for r in lever_table(worse).rows}[5]["pixel AP verdict"] == "worse"
    assert lever_table([r for r in rows if not r.synthetic]) is None


def test_compare_refuses_advise_in_its_cells():
    """A cell's config is written whole (every key given: no advice would apply) and an advised config.yaml would
    make every finished cell look stale: advise=true is refused, naming where it was set and what to do instead."""
    import pytest

    from synthvit.compare.config import CompareConfig, ModelSpec
    from synthvit.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"finetune.advise: advise=true is not for compare cells.*synthvit doctor"):
        load_config(CompareConfig, overrides=["finetune.advise=true"])
    with pytest.raises(ConfigError, match=r"models.vit.overrides: advise=true"):
        CompareConfig(models=[ModelSpec(name="vit", model="vit_tiny_patch16_224", overrides=["advise=true"])])
