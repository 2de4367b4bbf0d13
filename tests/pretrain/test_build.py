"""The end of a run as build_trainer wires it: the attempt recorded first, then (after a clean end) the last barrier
that keeps every rank alive until it is."""

import pytest

from pretrain.build import ended, open_attempt
from pretrain.config import ConfigError
from pretrain.errors import Stopped
from pretrain.job import StopRequest


class Calls:
    def __init__(self, fail=False):
        self.log, self.fail = [], fail

    def end(self, error):
        self.log.append(("recorded", type(error).__name__ if error else None))

    def barrier(self):
        self.log.append(("barrier",))
        if self.fail:
            raise RuntimeError("Connection closed by peer")


@pytest.fixture
def stop():
    s = StopRequest(["SIGUSR1"], grace=60)
    yield s
    s.disarm()
    s.restore()


@pytest.mark.parametrize("error, barrier", [(None, True), (Stopped("SIGUSR1 received"), True),
                                            (RuntimeError("boom"), False)])  # fmt: skip
def test_the_end_is_recorded_then_clean_ends_wait_for_every_rank(stop, error, barrier):
    calls = Calls()
    ended(calls, calls, stop, error)
    expected = [("recorded", type(error).__name__ if error else None)] + ([("barrier",)] if barrier else [])
    assert calls.log == expected
    assert stop._timer is None  # the deadline armed for the barrier is gone once it is passed


def test_a_rank_gone_before_the_last_barrier_is_not_an_error(stop, caplog):
    calls = Calls(fail=True)
    ended(None, calls, stop, None)  # (ranks other than 0 record nothing)
    assert calls.log == [("barrier",)] and "the last barrier failed (Connection closed by peer)" in caplog.text


def test_a_run_dir_that_cannot_be_written_is_bad_input(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="train.run_dir: cannot write in"):
        open_attempt(tmp_path / "file" / "run")


def test_document_masking_takes_the_end_of_document_id_from_the_tokenizer():
    from types import SimpleNamespace

    from pretrain.build import resolve
    from pretrain.config import ConfigError, RunConfig

    tok = SimpleNamespace(vocab_size=1000, eod_id=2)
    cfg = RunConfig()
    assert resolve(cfg, tok).model.eod_id is None  # without document masking none is recorded, as before
    cfg.model.document_masking = True
    assert resolve(cfg, tok).model.eod_id == 2 and cfg.model.eod_id is None  # a copy
    cfg.model.eod_id = 7
    with pytest.raises(ConfigError, match="model.eod_id: 7 is not the tokenizer's end-of-document id 2"):
        resolve(cfg, tok)
