"""`remask plot` against the metrics it was given: written metrics.jsonl files, the series it
draws from them, and the PNG it writes."""

from __future__ import annotations

import json

import pytest
import yaml

from remask.app.cli import main as cli_main


def test_plot_draws_each_runs_metrics(tmp_path, monkeypatch):
    """`remask plot` over two written metrics.jsonl files: each run's training curve is its
    (tokens, loss_avg or loss) points, its validation curve its val_loss points, labelled by its
    objective; the PNG decodes at the figure's size (12 x 4.5 inches at 120 dpi)."""
    image_io = pytest.importorskip("matplotlib.image")

    import remask.app.plot as plot

    runs = {"mdm": [{"step": 1, "loss": 5.0, "lr": 1e-3, "tokens": 100, "tokens_per_s": 9.0},
                    {"step": 2, "loss": 4.0, "loss_avg": 4.5, "lr": 1e-3, "tokens": 200, "tokens_per_s": 9.0,
                     "val_loss": 4.8},
                    {"step": 3, "loss": 3.0, "lr": 1e-3, "tokens": 300, "tokens_per_s": 9.0, "val_loss": 4.1}],
            "ar": [{"step": 1, "loss": 6.0, "lr": 1e-3, "tokens": 50, "tokens_per_s": 9.0, "val_loss": 5.5},
                   {"step": 2, "loss": 2.5, "lr": 1e-3, "tokens": 150, "tokens_per_s": 9.0}]}
    for name, records in runs.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        (tmp_path / name / "config.yaml").write_text(yaml.safe_dump({"objective": name}))
    drawn = {}
    real_save = plot.save_png

    def capture(fig, out, **kw):
        for ax in fig.axes:
            drawn[ax.get_title()] = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
                                     for line in ax.lines}
        return real_save(fig, out, **kw)

    monkeypatch.setattr(plot, "save_png", capture)
    out = tmp_path / "loss.png"
    assert cli_main(["plot", str(tmp_path / "mdm"), str(tmp_path / "ar"), "--out", str(out)]) == 0
    assert drawn["training loss"] == {"mdm MDM (bound)": ([100, 200, 300], [5.0, 4.5, 3.0]),
                                      "ar AR": ([50, 150], [6.0, 2.5])}
    assert drawn["validation loss (MDM: NLL bound)"] == {"mdm MDM (bound)": ([200, 300], [4.8, 4.1]),
                                                         "ar AR": ([50], [5.5])}
    image = image_io.imread(out, format="png")
    assert image.shape[:2] == (540, 1440) and image.std() > 0  # height, width; not a blank canvas
