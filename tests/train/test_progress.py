"""Progress reads well in a log file: plain lines every N iterations, a bar only on a terminal."""

import io

from spark_det.train.progress import ProgressLog


class Terminal(io.StringIO):
    def isatty(self):
        return True


def metrics(i):
    return {"epoch": i // 4, "loss": 1.0 / (i + 1), "lr": 1e-3, "images_per_s": 12.5}


def test_a_file_gets_a_plain_line_at_the_first_every_nth_and_last_iteration():
    stream = io.StringIO()
    log = ProgressLog(total=10, initial=0, every=4, iters_per_epoch=4, stream=stream)
    for i in range(10):
        log.update(metrics(i))
    log.close()
    lines = stream.getvalue().splitlines()
    assert [line.split()[2] for line in lines] == ["1/10", "4/10", "8/10", "10/10"]
    assert lines[1].startswith("[pretrain] it 4/10 epoch 1/3 loss 0.2500 lr 1.00e-03 img/s 12.5 eta ")
    assert "\r" not in stream.getvalue()


def test_a_resumed_run_counts_from_where_it_stopped():
    stream = io.StringIO()
    log = ProgressLog(total=10, initial=6, every=5, iters_per_epoch=4, stream=stream)
    for i in range(6, 10):
        log.update(metrics(i))
    assert [line.split()[2] for line in stream.getvalue().splitlines()] == ["7/10", "10/10"]


def test_a_terminal_gets_a_bar_and_other_ranks_get_nothing():
    terminal = Terminal()
    log = ProgressLog(total=3, initial=0, every=1, iters_per_epoch=3, stream=terminal)
    for i in range(3):
        log.update(metrics(i))
    log.close()
    assert "\r" in terminal.getvalue() and "[pretrain] it" not in terminal.getvalue()
    quiet = io.StringIO()
    log = ProgressLog(total=3, initial=0, every=1, iters_per_epoch=3, enabled=False, stream=quiet)
    log.update(metrics(0))
    assert quiet.getvalue() == ""
