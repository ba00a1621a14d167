import threading

import pytest

from torchloom.threadlet.buffer import DropOldestBuffer


def test_full_buffer_drops_oldest_and_counts():
    buf = DropOldestBuffer[int](3)
    for i in range(5):
        buf.append(i)
    assert buf.dropped == 2
    assert buf.drain() == [2, 3, 4]
    assert len(buf) == 0


def test_drain_limit_and_push_front():
    buf = DropOldestBuffer[int](10)
    for i in range(5):
        buf.append(i)
    first = buf.drain(2)
    assert first == [0, 1]
    buf.push_front(first)
    assert buf.drain() == [0, 1, 2, 3, 4]


def test_push_front_into_a_full_buffer_counts_every_item_that_did_not_fit():
    buf = DropOldestBuffer[int](4)
    taken = [0, 1, 2]
    for i in range(3, 6):
        buf.append(i)
    buf.push_front(taken)  # room for one: the newest of the taken ones goes back
    assert buf.drain() == [2, 3, 4, 5]
    assert buf.dropped == 2


def test_capacity_must_be_positive():
    with pytest.raises(ValueError):
        DropOldestBuffer[int](0)


def test_concurrent_producer_and_consumer_lose_nothing_but_drops():
    buf = DropOldestBuffer[int](1000)
    got: list[int] = []
    done = threading.Event()

    def consume():
        while not done.is_set() or len(buf):
            got.extend(buf.drain())

    t = threading.Thread(target=consume)
    t.start()
    for i in range(50_000):
        buf.append(i)
    done.set()
    t.join()
    assert len(got) + buf.dropped == 50_000
    assert got == sorted(got)
