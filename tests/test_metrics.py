"""Tests of train.metrics: the metrics log and switch table of a run directory."""

import json
import logging

import pytest

import swats_jax
from train import metrics
from train.metrics import MetricsError


def record(epoch, *, complete=True):
    return {
        "epoch": epoch,
        "step": 3 * epoch,
        "train_loss": 1 / 3,
        "train_accuracy": 0.5,
        "test_loss": 2.0,
        "test_accuracy": 0.25,
        "learning_rate": 1e-3,
        "sgd_scale": 0.1,
        "num_switched": epoch,
        "epoch_time_s": 1.234,
        "compile_time_s": 0.5,
        "images_per_s": 1e5,
        "complete": complete,
    }


def test_log_appends_and_keeps_both_files_in_their_format(tmp_path):
    log = metrics.MetricsLog(tmp_path)
    assert log.records() == []
    for epoch in (1, 2):
        log.append(record(epoch))
    assert log.records() == [record(1), record(2)] == metrics.read_metrics(tmp_path)
    jsonl = (tmp_path / "metrics.jsonl").read_text()
    assert jsonl == "".join(json.dumps(record(e)) + "\n" for e in (1, 2))
    assert jsonl.startswith('{"epoch": 1, "step": 3, "train_loss": 0.3333333333333333, ')
    row = "{},{},0.3333333333333333,0.5,2.0,0.25,0.001,0.1,{},1.234,0.5,100000.0,True\r\n"
    assert (tmp_path / "metrics.csv").read_bytes().decode() == (
        ",".join(metrics.METRICS_FIELDS) + "\r\n" + row.format(1, 3, 1) + row.format(2, 6, 2)
    )
    assert not list(tmp_path.glob("*.tmp"))


def test_keep_epochs_up_to_drops_later_and_incomplete_records(tmp_path):
    log = metrics.MetricsLog(tmp_path)
    for rec in (record(1), record(2), record(3, complete=False), record(4)):
        log.append(rec)
    log.keep_epochs_up_to(3)
    assert log.records() == [record(1), record(2)]
    assert (tmp_path / "metrics.csv").read_text().count("\n") == 3


def test_read_metrics_ignores_a_truncated_last_line_with_a_warning(tmp_path, caplog):
    metrics.MetricsLog(tmp_path).append(record(1))
    path = tmp_path / "metrics.jsonl"
    path.write_text(path.read_text() + '{"epoch": 2, "step": 15')
    with caplog.at_level(logging.WARNING, logger="train.metrics"):
        assert metrics.read_metrics(tmp_path) == [record(1)]
    assert any(str(path) in r.getMessage() for r in caplog.records)


def test_a_garbled_log_is_not_rewritten(tmp_path):
    garbled = '{"epoch": 1, "complete": true}\n{"epoch": 2, "comp\n{"epoch": 3}\n'
    (tmp_path / "metrics.jsonl").write_text(garbled)
    log = metrics.MetricsLog(tmp_path)
    with pytest.raises(MetricsError, match="line 2: not JSON .*; repair or move the file"):
        log.append(record(4))
    assert (tmp_path / "metrics.jsonl").read_text() == garbled
    assert issubclass(MetricsError, ValueError)


def test_switch_table_round_trip(tmp_path):
    events = [
        swats_jax.SwitchEvent("layer1/0/conv1/kernel", 5, 1.23456789e-3),
        swats_jax.SwitchEvent("fc/bias", 7, 0.5),
    ]
    metrics.write_switch_table(tmp_path, events)
    assert (tmp_path / "switches.md").read_text() == swats_jax.format_switch_table(events)
    assert (tmp_path / "switches.csv").read_text() == (
        "layer,step,sgd_lr\nlayer1/0/conv1/kernel,5,0.00123457\nfc/bias,7,0.5\n"
    )
    assert metrics.read_switch_table(tmp_path) == [
        ("layer1/0/conv1/kernel", 5, 0.00123457),
        ("fc/bias", 7, 0.5),
    ]
    metrics.write_switch_table(tmp_path, [])
    assert metrics.read_switch_table(tmp_path) == []


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("metrics.jsonl", 'not json\n{"epoch": 1}\n', r"metrics\.jsonl, line 1: not JSON"),
        ("metrics.jsonl", '[1]\n{"epoch": 1}\n', r"metrics\.jsonl, line 1: expected a JSON object"),
        ("metrics.jsonl", None, r"cannot read .*metrics\.jsonl"),
        ("switches.csv", "layer,step\nconv/kernel,3\n", "expected the columns layer,step,sgd_lr"),
        ("switches.csv", "layer,step,sgd_lr\nc/k,soon,0.1\n", "expected the columns layer,step"),
        ("switches.csv", None, r"cannot read .*switches\.csv"),
    ],
)
def test_unreadable_files_raise_metrics_error_naming_the_file(tmp_path, name, content, message):
    if content is not None:
        (tmp_path / name).write_text(content)
    read = metrics.read_metrics if name == "metrics.jsonl" else metrics.read_switch_table
    with pytest.raises(MetricsError, match=message):
        read(tmp_path)


def test_non_finite_values_are_written_as_json_null(tmp_path):
    log = metrics.MetricsLog(tmp_path)
    log.append({**record(1), "test_loss": float("nan"), "train_loss": float("inf")})

    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")

    line = (tmp_path / "metrics.jsonl").read_text()
    parsed = json.loads(line, parse_constant=refuse)  # strict: NaN/Infinity would raise
    assert parsed["test_loss"] is None and parsed["train_loss"] is None
    assert parsed["test_accuracy"] == 0.25
