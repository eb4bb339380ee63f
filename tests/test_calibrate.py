"""The defect decision: fitted after training on training frames only (test pixels never read), stored in the
export, used by evaluate and predict (a user threshold still overrides), absent from old exports; and a ViT trained
on small crops predicts at another tile size, while a tile it cannot take is refused before training."""
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import assert_cli_error, make_real_data
from finetune import run as finetune_run
from finetune.artifacts import read_split
from finetune.calibrate import fit_decision, scored_frames
from finetune.config import CalibrateConfig, FinetuneConfig
from finetune.predict import MaskRule
from synthvit.data import has_defect, load_real_data, split_ids
from synthvit.models import Decision, ExportMeta, Heads, class_map, read_export_meta
from synthvit.models.decision import BINS, DefectHistogram, logit_adjust_threshold, shrunk_threshold

LEGACY = Path(__file__).parent / "data" / "legacy"
DEFECT = np.s_[20:28, 24:40]  # every odd frame's defect (grey 30)


def test_histogram_threshold_maximises_iou_and_logit_adjustment_undoes_the_prior():
    hist = DefectHistogram()
    p = torch.cat([torch.full((100,), 0.9), torch.full((1000,), 0.6), torch.full((10_000,), 0.1)])
    target = torch.cat([torch.ones(100), torch.zeros(11_000)])
    hist.add(p, target, weight=2.0)
    t, iou = hist.best()
    assert 0.6 < t <= 0.9 and iou == pytest.approx(1.0)  # only the defects are above it
    assert hist.iou_at(0.5) == pytest.approx(100 / 1100)  # argmax calls the 0.6 background defect too
    assert hist.defect_share == pytest.approx(100 / 11_100)  # weights cancel in shares
    assert logit_adjust_threshold(0.5, 0.05) == pytest.approx(0.95)  # odds 1 against 1/19
    assert logit_adjust_threshold(0.1, 0.1) == pytest.approx(0.5)  # no prior shift: argmax


def test_class_map_decides_defect_then_the_most_probable_defect_class():
    probs = torch.tensor([[0.40, 0.90, 0.30], [0.35, 0.05, 0.30], [0.25, 0.05, 0.40]])[:, None, :]  # (3, 1, 3)
    assert class_map(probs, None).flatten().tolist() == [0, 0, 2]  # argmax
    assert class_map(probs, 0.5).flatten().tolist() == [1, 0, 2]  # p(defect) 0.6 > 0.5: defect, class 1
    assert class_map(probs, 0.65).flatten().tolist() == [0, 0, 2]
    binary = torch.tensor([[0.3, 0.8], [0.7, 0.2]])[:, None, :]
    assert class_map(binary, 0.6).flatten().tolist() == [1, 0]


def _poison_all_but(data, keep: set[str]) -> None:
    """Items outside ``keep`` raise on any read of their image or mask."""
    def boom(*_):
        raise AssertionError("a test frame was read during calibration")

    for item in data.items:
        if item.id not in keep:
            item.load, item.mask = boom, boom


class Oracle:
    """A fake predictor: p(defect) 0.8 on defect pixels (grey 30), 0.7 on the two rows above them (a halo the
    IoU-best threshold must cut), 0.05 elsewhere."""

    def __init__(self):
        self.meta = SimpleNamespace(heads=Heads.parse("seg"))
        self.tiler = SimpleNamespace(tile=32)

    def __call__(self, image):
        defect = torch.from_numpy(image[..., 0] == 30)
        halo = torch.zeros_like(defect)
        halo[:-2] |= defect[2:]
        halo[:-1] |= defect[1:]
        p = torch.full(defect.shape, 0.05)
        p[halo & ~defect] = 0.7
        p[defect] = 0.8
        return {"probs": torch.stack([1 - p, p])}


def test_decision_is_fitted_on_the_training_frames_alone(tmp_path):
    root = make_real_data(tmp_path / "data", 20, (48, 64), lambda rng: DEFECT)
    data = load_real_data(root)
    split = split_ids(data, 0.3, 0)
    train = [i for i in data.items if split[i.id] == "train"]
    assert len(train) < len(data.items)
    _poison_all_but(data, {i.id for i in train})
    cfg = FinetuneConfig(data=str(root), crop_size=32, steps=50, batch_size=4, defect_crop_prob=1.0)
    decision = fit_decision(Oracle(), data, train, cfg)
    fitted = decision.candidates["threshold"]
    assert 0.7 < fitted <= 0.8  # the halo cut, the defect kept
    n_def = decision.prior["defective_frames"]
    assert n_def == sum(has_defect(i) for i in train) and 0 < n_def < 20
    assert decision.rule == "shrink" and decision.threshold == pytest.approx(shrunk_threshold(fitted, n_def), abs=1e-6)
    assert 0.5 < decision.threshold < fitted  # a handful of defective frames: pulled toward 0.5
    assert decision.train_defect_iou["threshold"] == pytest.approx(1.0)
    assert decision.train_defect_iou["p>0.5"] == pytest.approx(128 / 160)  # the 2-row halo painted too
    natural, sampled = decision.prior["natural"], decision.prior["sampled"]
    assert natural == pytest.approx(128 / (48 * 64) / 2, rel=0.35)  # about half the train frames hold 128 px
    assert sampled > 2.5 * natural  # every crop defect-centred: the prior shift the decision undoes
    assert decision.candidates["logit-adjust"] == pytest.approx(logit_adjust_threshold(sampled, natural))
    assert decision.fitted_on.startswith("train split") and "defective" in decision.fitted_on
    logit = fit_decision(Oracle(), data, train, FinetuneConfig(data=str(root), crop_size=32, steps=50,
                                                               calibrate=CalibrateConfig(rule="logit-adjust")))
    assert logit.threshold == logit.candidates["logit-adjust"]
    assert fit_decision(Oracle(), data, train, FinetuneConfig(data=str(root), calibrate=CalibrateConfig(rule="argmax"))) is None


def test_scored_frames_are_capped_stratified_and_weighted(tmp_path):
    root = make_real_data(tmp_path / "data", 30, (16, 16), lambda rng: np.s_[2:4, 2:4])
    items = load_real_data(root).items
    groups = scored_frames(items, 8, seed=0)
    assert [(kind, len(frames), whole) for kind, frames, whole in groups] == [("defective", 4, 15),
                                                                             ("defect-free", 4, 15)]
    assert scored_frames(items, 8, seed=0) == groups  # seeded
    few = scored_frames(items[:3], 8, seed=0)  # fewer than the cap: every frame, weight 1
    assert [(k, len(f), w) for k, f, w in few] == [("defective", 1, 1), ("defect-free", 2, 2)]


def test_finetune_fits_the_decision_from_train_frames_and_predict_uses_it(tmp_path, cli, monkeypatch,
                                                                            one_torch_thread):
    root = make_real_data(tmp_path / "data", 12, (48, 64), lambda rng: DEFECT)
    seen = {}
    real_fit = finetune_run.fit_decision

    def spy(predictor, data, items, cfg, synthetic=None, **kw):  # every frame but the given training ones is poisoned
        seen["ids"] = {i.id for i in items}
        _poison_all_but(data, seen["ids"])
        return real_fit(predictor, data, items, cfg, synthetic, **kw)

    monkeypatch.setattr(finetune_run, "fit_decision", spy)
    run = tmp_path / "run"
    res = cli("finetune", f"data={root}", f"out_dir={run}", "task=seg", "crop_size=32", "steps=3", "batch_size=2",
              "num_workers=0", "defect_crop_prob=1.0", "evaluate=false")
    assert res.returncode == 0, res.err[-2000:]
    assert seen["ids"] == {i for i, s in read_split(run).items() if s == "train"}
    decision = read_export_meta(run / "export").decision
    assert decision is not None and decision.prior["sampled"] > 2.5 * decision.prior["natural"]
    # predict: the export's decision by default, a user threshold over it
    frame = root / "images" / "im01.png"
    assert cli("predict", f"checkpoint={run}", f"input={frame}", f"out={tmp_path / 'auto'}").returncode == 0
    record = json.loads((tmp_path / "auto" / "im01.json").read_text())
    assert record["decision"] == {"rule": "shrink", "threshold": decision.threshold}
    assert cli("predict", f"checkpoint={run}", f"input={frame}", f"out={tmp_path / 'all'}", "threshold=0").returncode == 0
    record = json.loads((tmp_path / "all" / "im01.json").read_text())
    assert record["decision"] == {"rule": "user", "threshold": 0.0} and record["areas"]["defect"] == 48 * 64
    # evaluate scores the decision and argmax side by side
    assert cli("evaluate", f"checkpoint={run}").returncode == 0
    pixel = json.loads((run / "metrics_test.json").read_text())["pixel"]
    assert pixel["rule"] == "shrink" and pixel["threshold"] == decision.threshold
    assert set(pixel["argmax"]) == {"iou", "miou", "dice", "mdice", "defect_pixel_ratio"}
    assert set(pixel["rules"]) == {"threshold", "shrink", "logit-adjust"} and pixel["defect_pixels"] > 0
    # calibrate again, keeping the other rule
    assert cli("calibrate", f"checkpoint={run}", "rule=logit-adjust").returncode == 0
    again = read_export_meta(run / "export").decision
    assert again.rule == "logit-adjust" and again.threshold == again.candidates["logit-adjust"]


def test_an_old_export_without_a_decision_keeps_argmax():
    doc = json.loads((LEGACY / "finetune_export_config.json").read_text())
    meta = ExportMeta.from_json(doc, "finetune_export_config.json")
    assert meta.decision is None and "decision" not in meta.to_json()  # the old shape, written back
    assert MaskRule.of(meta, "auto") == MaskRule("argmax", None)
    assert MaskRule.of(meta, "0.3") == MaskRule("user", 0.3)
    probs = torch.tensor([[0.6, 0.4], [0.4, 0.6]])[:, None, :]
    assert MaskRule.of(meta, "auto").classes(probs).flatten().tolist() == [0, 1]
    fitted = Decision(rule="threshold", threshold=0.9, candidates={"threshold": 0.9, "logit-adjust": 0.8})
    meta.decision = fitted
    back = ExportMeta.from_json(json.loads(json.dumps(meta.to_json())), "x")
    assert back.decision == fitted and MaskRule.of(back, "auto") == MaskRule("threshold", 0.9)
    with pytest.raises(Exception, match=r"x: decision.rule is 'median'"):
        ExportMeta.from_json(dict(meta.to_json(), decision={"rule": "median", "threshold": 0.5}), "x")


def test_a_vit_trained_on_small_crops_predicts_at_a_larger_tile_and_an_impossible_tile_is_refused_first(
        tmp_path, cli, one_torch_thread):
    root = make_real_data(tmp_path / "data", 8, (48, 64), lambda rng: DEFECT)
    common = [f"data={root}", "task=seg", "crop_size=32", "steps=2", "batch_size=2", "num_workers=0"]
    bad = tmp_path / "bad"
    assert_cli_error(cli("finetune", *common, f"out_dir={bad}", "tiling.tile=40"), 2,
                     "tiling.tile=40", "multiple of 16", "tiling.tile=48 or 32")
    assert not bad.exists()  # refused before anything was trained or written
    run = tmp_path / "run"
    res = cli("finetune", *common, f"out_dir={run}", "tiling.tile=64")
    assert res.returncode == 0, res.err[-2000:]
    assert json.loads((run / "metrics.json").read_text())["pixel"]["defect_pixels"] > 0
    frame = root / "images" / "im01.png"
    assert cli("predict", f"checkpoint={run}", f"input={frame}", f"out={tmp_path / 'p'}").returncode == 0
    assert json.loads((tmp_path / "p" / "im01.json").read_text())["width"] == 64


def test_large_frames_are_scored_on_cells_that_stand_for_the_whole_frame():
    from finetune.calibrate import calibration_cells

    rng = np.random.default_rng(0)
    small = np.zeros((300, 400), np.uint8)
    assert calibration_cells(small, 200_000, 512, rng) == [((slice(0, 300), slice(0, 400)),) * 2 + (1.0,)]
    assert len(calibration_cells(np.zeros((2160, 3840), np.uint8), 0, 512, rng)) == 1  # 0: whole frames

    mask = np.zeros((1536, 2048), np.uint8)  # 3 x 4 cells of 512; defects in two of them
    mask[10:20, 10:20] = 1
    mask[1500:1510, 1100:1110] = 2
    cells = calibration_cells(mask, 4 * 512 * 512, 512, rng)
    weights = sorted(w for _, _, w in cells)
    assert weights == [1.0, 1.0, 5.0, 5.0]  # both defect cells; 2 of the 10 others, each standing for 5
    assert sum(w * (c[0].stop - c[0].start) * (c[1].stop - c[1].start) for _, c, w in cells) == mask.size
    assert sum(int(np.count_nonzero(mask[c])) for _, c, w in cells if w == 1.0) == 200  # every defect pixel counted
    for window, cell, _ in cells:
        assert window[0].stop - window[0].start == window[1].stop - window[1].start == 512
        assert window[0].start <= cell[0].start and cell[0].stop <= window[0].stop <= 1536
        assert window[1].start <= cell[1].start and cell[1].stop <= window[1].stop <= 2048

    ragged = np.zeros((2160, 3840), np.uint8)  # edge cells are partial; windows stay 512 and inside the frame
    ragged[2100:2110, 3800:3810] = 1
    edge = calibration_cells(ragged, 2_000_000, 512, rng)
    assert any(c == (slice(2048, 2160), slice(3584, 3840)) and win == (slice(1648, 2160), slice(3328, 3840))
               for win, c, _ in edge)


def test_cell_scoring_estimates_the_whole_frame_histogram_without_bias():
    from finetune.calibrate import calibration_cells

    h, w = 1536, 2048
    yy, xx = np.mgrid[:h, :w]
    p = 0.5 + 0.45 * np.sin(yy / 97.0) * np.cos(xx / 61.0)  # a p(defect) map that differs from cell to cell
    mask = np.zeros((h, w), np.uint8)
    mask[700:760, 900:1000] = 1
    whole = DefectHistogram()
    whole.add(torch.from_numpy(p), torch.from_numpy(mask), 1.0)
    drawn = DefectHistogram()
    draws = 200
    for seed in range(draws):
        for _, cell, share in calibration_cells(mask, 3 * 512 * 512, 512, np.random.default_rng(seed)):
            drawn.add(torch.from_numpy(p[cell]), torch.from_numpy(mask[cell]), share / draws)
    assert torch.allclose(drawn.pos, whole.pos)  # every defect cell is always scored
    assert float(drawn.neg.sum()) == pytest.approx(float(whole.neg.sum()), rel=1e-9)
    above = lambda hist: float(hist.neg[BINS // 2:].sum())  # noqa: E731  background pixels over p = 0.5
    assert above(drawn) == pytest.approx(above(whole), rel=0.05)
    assert drawn.best()[0] == pytest.approx(whole.best()[0], abs=0.05)


@pytest.mark.parametrize("k", [2, 3, 7])
def test_class_map_matches_the_plain_argmax_rule_with_ties(k):
    """class_map (and the shared per-frame defect class evaluate passes for every rule) is the plain rule: argmax, or
    a defect where 1 - p(background) > t, of the first most probable defect class."""
    from synthvit.models.decision import top_class

    g = torch.Generator().manual_seed(k)
    probs = (torch.rand(k, 24, 40, generator=g) * 4).round() + 0.01  # many ties
    probs /= probs.sum(0)
    shared = top_class(probs[1:]) + 1 if k > 2 else None
    for t in (None, 0.0, 0.3, 0.7, 1.0):
        if t is None:
            want = probs.argmax(0)
        else:
            want = torch.where((1 - probs[0]) > t, probs[1:].argmax(0) + 1, torch.zeros((24, 40), dtype=torch.int64))
        assert torch.equal(class_map(probs, t), want) and torch.equal(class_map(probs, t, shared), want)


def test_shrink_pulls_the_fitted_threshold_toward_one_half_by_the_defects_it_saw():
    from synthvit.models.decision import SHRINK_FRAMES, shrunk_threshold

    assert shrunk_threshold(0.99, 0) == pytest.approx(0.5)
    assert shrunk_threshold(0.2, 0) == pytest.approx(0.5)
    few, many = shrunk_threshold(0.99, 5), shrunk_threshold(0.99, 5000)
    assert 0.5 < few < shrunk_threshold(0.99, 50) < many < 0.99 and many == pytest.approx(0.99, abs=2e-3)
    # the weight is n / (n + k) on the logit scale: at n = k, halfway between logit(0.5) = 0 and logit(t)
    mid = shrunk_threshold(0.9, SHRINK_FRAMES)
    assert math.log(mid / (1 - mid)) == pytest.approx(0.5 * math.log(9))
    assert shrunk_threshold(0.1, 5) > 0.1  # a low fit is pulled up, toward 0.5, too
