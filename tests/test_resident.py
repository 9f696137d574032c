"""Issue 23: the default placement of in-memory data (`data_on_device=None`) and its memory budget."""

import collections
import dataclasses

import numpy as np
import pytest

import toys
from flaxlesson import parallel, sources, training


@dataclasses.dataclass
class _Device:
    platform: str
    limit: int

    def memory_stats(self):
        return {"bytes_limit": self.limit}


@dataclasses.dataclass
class _Strategy:
    devices: list
    process_count: int = 1


def _data(n=40):
    return np.zeros((n, 4), np.float32), np.zeros(n, np.int32)  # 16 + 4 bytes a row


def test_a_default_fit_on_cpu_devices_reads_the_host_arrays_without_a_resident_copy(monkeypatch):
    def copied(*args, **kwargs):
        raise AssertionError("the training set was copied to the devices")

    monkeypatch.setattr(sources.ResidentSource, "__init__", copied)
    state = toys.mlp_state()
    x, y = _data()
    _, history = training.fit(state, x, y, batch_size=8, verbose=0, strategy="sharded")
    assert history.epoch == [0]


def test_on_accelerators_the_set_stays_resident_within_its_share_of_one_device():
    x, y = _data()  # 800 bytes
    assert sources.fits_on_device(x, y, _Strategy([_Device("gpu", 3200)] * 2))  # 800 <= 0.25 * 3200
    assert not sources.fits_on_device(x, y, _Strategy([_Device("gpu", 3199)] * 2))
    assert not sources.fits_on_device(x, y, _Strategy([_Device("gpu", 10**9)], process_count=2))


def test_a_fit_reading_fewer_rows_than_the_set_holds_copies_nothing_to_the_devices():
    x, y = _data()  # 40 rows, 800 bytes
    gpus = _Strategy([_Device("gpu", 3200)])
    assert not sources.fits_on_device(x, y, gpus, rows_read=39)  # e.g. 5 steps of batch 8 less one row
    assert sources.fits_on_device(x, y, gpus, rows_read=40) and sources.fits_on_device(x, y, gpus, rows_read=80)


def test_data_on_device_on_cpu_counts_one_copy_per_device_against_the_available_memory(monkeypatch):
    x, y = _data()
    strategy = parallel.get_strategy("sharded")
    memory = collections.namedtuple("memory", "available")
    monkeypatch.setattr(sources.psutil, "virtual_memory", lambda: memory(800 * len(strategy.devices) - 1))
    with pytest.raises(ValueError, match=rf"^data_on_device: {len(strategy.devices)} resident copies of"):
        sources.ArraySource(x, y).placed(strategy, True)
    monkeypatch.setattr(sources.psutil, "virtual_memory", lambda: memory(800 * len(strategy.devices)))
    assert isinstance(sources.ArraySource(x, y).placed(strategy, True), sources.ResidentSource)
