import json

import numpy as np
import pytest
from scipy import stats

from qalign_kvq.evaluate import (
    EvaluationInputError,
    compute_metrics,
    final_score,
    main,
    read_pairs_xlsx,
    read_scores,
)


def test_leaderboard_arithmetic():
    assert round(final_score(0.9361, 0.9359, 0.7792, 0.8284), 4) == 0.9228


def test_cli_final(capsys):
    assert main(["--final", "0.9361", "0.9359", "0.7792", "0.8284"]) == 0
    assert "0.9228" in capsys.readouterr().out


TRUTH = {"a.mp4": 3.1, "b.mp4": 2.0, "c.mp4": 4.2, "d.mp4": 1.5, "e.mp4": 3.6}
PRED = {"a.mp4": 0.61, "b.mp4": 0.40, "c.mp4": 0.58, "d.mp4": 0.40, "e.mp4": 0.75}
HOMOLOGOUS = [("a.mp4", "b.mp4", 1), ("b.mp4", "d.mp4", 1), ("d.mp4", "b.mp4", 2), ("c.mp4", "e.mp4", 1)]
NONHOMOLOGOUS = [("a.mp4", "c.mp4", 2), ("e.mp4", "d.mp4", 1), ("b.mp4", "a.mp4", 2)]


def test_metrics_on_a_hand_made_case_equal_scipy_and_a_hand_count():
    m = compute_metrics(PRED, TRUTH, HOMOLOGOUS, NONHOMOLOGOUS)
    names = sorted(TRUTH)
    p = [PRED[n] for n in names]
    t = [TRUTH[n] for n in names]
    assert m["SROCC"] == pytest.approx(stats.spearmanr(p, t)[0])
    assert m["PLCC"] == pytest.approx(stats.pearsonr(p, t)[0])
    # by hand: a>b yes; b>=d tie -> 1 yes; d vs b tie -> 1 but label 2: miss; c>e? no (0.58<0.75) -> 2, label 1: miss
    assert m["Rank1"] == pytest.approx(2 / 4)
    # a (0.61) >= c (0.58) -> 1, label 2: miss; e>d -> 1 yes; b<a -> 2 yes
    assert m["Rank2"] == pytest.approx(2 / 3)
    assert m["Final"] == pytest.approx(0.45 * m["SROCC"] + 0.45 * m["PLCC"] + 0.05 * 0.5 + 0.05 * 2 / 3)


def test_plcc_is_invariant_to_affine_but_not_to_nonlinear_maps():
    base = compute_metrics(PRED, TRUTH)
    affine = compute_metrics({k: 4 * v + 1 for k, v in PRED.items()}, TRUTH)
    squashed = compute_metrics({k: float(np.exp(5 * v)) for k, v in PRED.items()}, TRUTH)
    assert affine["PLCC"] == pytest.approx(base["PLCC"])
    assert squashed["PLCC"] != pytest.approx(base["PLCC"])
    assert base["Rank1"] is None and base["Final"] is None


def test_mismatched_and_nan_inputs_are_refused():
    with pytest.raises(EvaluationInputError, match="different files"):
        compute_metrics({**PRED, "z.mp4": 1.0}, TRUTH)
    with pytest.raises(EvaluationInputError, match="without prediction"):
        compute_metrics({k: v for k, v in PRED.items() if k != "a.mp4"}, TRUTH)
    with pytest.raises(EvaluationInputError, match="non-finite"):
        compute_metrics({**PRED, "a.mp4": float("nan")}, TRUTH)
    with pytest.raises(EvaluationInputError, match="no prediction"):
        compute_metrics(PRED, TRUTH, [("a.mp4", "q.mp4", 1)])


def _write(path, header, rows):
    path.write_text("\n".join([header] + [",".join(map(str, r)) for r in rows]) + "\n")
    return path


def test_cli_end_to_end_with_csv_pairs(tmp_path, capsys):
    pred = _write(tmp_path / "prediction.csv", "filename,score", PRED.items())
    truth = _write(tmp_path / "truth.csv", "filename,score", TRUTH.items())
    hom = _write(tmp_path / "h.csv", "video1,video2,label", HOMOLOGOUS)
    non = _write(tmp_path / "n.csv", "video1,video2,label", NONHOMOLOGOUS)
    out = tmp_path / "metrics.json"
    code = main(["--pred", str(pred), "--truth", str(truth), "--pairs-homologous", str(hom),
                 "--pairs-nonhomologous", str(non), "--json", str(out)])
    assert code == 0
    saved = json.loads(out.read_text())
    assert saved == pytest.approx(compute_metrics(PRED, TRUTH, HOMOLOGOUS, NONHOMOLOGOUS))
    assert "Final" in capsys.readouterr().out


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "empty file"),
        ("filename,score\n", "no rows"),
        ("filename,score\na.mp4,\n", "not a number"),
        ("filename,score\na.mp4,nan\n", "a.mp4"),
        ("filename,score\na.mp4,1\na.mp4,2\n", "duplicate"),
        ("name,value\na.mp4,1\n", "lacks columns"),
    ],
)
def test_bad_score_files_name_the_file_and_the_problem(tmp_path, content, message):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(EvaluationInputError, match=message) as info:
        read_scores(path)
    assert "bad.csv" in str(info.value)


def test_cli_reports_bad_input_with_exit_code_2(tmp_path, capsys):
    truth = _write(tmp_path / "truth.csv", "filename,score", TRUTH.items())
    assert main(["--pred", str(tmp_path / "missing.csv"), "--truth", str(truth)]) == 2
    assert "missing.csv" in capsys.readouterr().err


def test_rank_pair_xlsx(tmp_path):
    from openpyxl import Workbook

    book = Workbook()
    book.active.title = "source"
    book.active.append(["video1", "video2", "label"])
    for row in HOMOLOGOUS:
        book.active.append(list(row))
    sheet = book.create_sheet("nonsource")
    for row in NONHOMOLOGOUS:
        sheet.append(list(row))
    path = tmp_path / "rank-pair-val.xlsx"
    book.save(path)
    hom, non = read_pairs_xlsx(path)
    assert hom == HOMOLOGOUS and non == NONHOMOLOGOUS
