"""A trainer that goes quiet: when the train stage says so (StallWatch), on real files; the stacks themselves are
asked of real ranks in tests/test_train_recovery.py (kill_after_checkpoint)."""

import pytest

from tutor_wrap.backends.axolotl_train import STALL_FLOOR_S, StallWatch, dump_stacks

pytestmark = pytest.mark.unit


def _grow(path, text="step\n"):
    with open(path, "a") as fh:
        fh.write(text)


def _steps(watch, log, start, end, every=2):
    for t in range(int(start) + every, int(end), every):
        _grow(log)
        assert watch.stalled(float(t)) is None
    return float(t)


def test_a_silence_is_reported_once_when_it_passes_the_floor(tmp_path):
    log = tmp_path / "train.log"
    watch = StallWatch([log, tmp_path / "metrics.jsonl"], now=0.0)
    last = _steps(watch, log, 0, 60)
    assert watch.stalled(last + STALL_FLOOR_S - 1) is None
    assert watch.stalled(last + STALL_FLOOR_S) == STALL_FLOOR_S
    assert watch.stalled(last + 2 * STALL_FLOOR_S) is None          # once per silence


def test_the_metrics_file_counts_as_progress(tmp_path):
    log, metrics = tmp_path / "train.log", tmp_path / "metrics.jsonl"
    watch = StallWatch([log, metrics], now=0.0)
    _grow(metrics, "{}\n")
    assert watch.stalled(10.0) is None                               # it changed: a new spell starts here
    assert watch.stalled(9.0 + STALL_FLOOR_S) is None
    assert watch.stalled(10.0 + STALL_FLOOR_S) == STALL_FLOOR_S


def test_a_long_pause_it_came_back_from_raises_the_bar(tmp_path):
    log = tmp_path / "train.log"
    watch = StallWatch([log], now=0.0)
    # a checkpoint save of half the floor: not reported, but a silence now needs 3 x as long
    save = STALL_FLOOR_S / 2
    assert watch.stalled(save) is None
    last = _steps(watch, log, save, save + 40)
    assert watch.stalled(last + 1.45 * STALL_FLOOR_S) is None
    assert watch.stalled(last + 1.55 * STALL_FLOOR_S) == 1.55 * STALL_FLOOR_S


def test_the_same_hang_is_reported_again_after_a_longer_silence(tmp_path):
    log = tmp_path / "train.log"
    watch = StallWatch([log], now=0.0)
    assert watch.stalled(STALL_FLOOR_S) == STALL_FLOOR_S
    _grow(log, "Thread 0x... (most recent call first):\n")           # the stacks it asked for
    assert watch.stalled(STALL_FLOOR_S + 1) is None
    assert watch.stalled(STALL_FLOOR_S + 1 + 2.9 * STALL_FLOOR_S) is None
    assert watch.stalled(STALL_FLOOR_S + 1 + 3.05 * STALL_FLOOR_S) is not None


def test_no_trainer_no_signal(tmp_path):
    # nothing recorded (no trainer.json, no rank list), or ranks listed that are not this launch's processes
    assert dump_stacks(tmp_path) == []
    (tmp_path / "trainer.json").write_text('{"pgid": 1, "launch_yml": "/nonexistent/axolotl.launch.yml"}')
    (tmp_path / "rank_pids").write_text("1\n")
    assert dump_stacks(tmp_path) == []
