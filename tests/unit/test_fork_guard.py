"""A fork waits until the Threadlet's I/O thread is out of its callbacks (where TLS, and so
OpenSSL, runs): a child forked while that thread was inside OpenSSL's one-time set-up hung on
its first hash (a DataLoader worker's fd-passing thread in ``hmac.new``; one fresh secure
training process in six forked during its Threadlet's start had such a child)."""

import asyncio
import os
import threading

from torchloom.threadlet import agent


def test_a_fork_waits_for_the_io_thread_to_leave_its_callback():
    guard = agent._Guard()
    order: list[str] = []
    entered, release = threading.Event(), threading.Event()

    def io_thread() -> None:
        guard.lock.acquire()
        agent._GUARDS.add(guard)
        loop = asyncio.SelectorEventLoop(agent._GuardedSelector(guard.lock))

        def busy() -> None:  # a callback doing work, as a TLS handshake does
            entered.set()
            release.wait(30)
            order.append("callback done")
            loop.stop()

        loop.call_soon(busy)
        try:
            loop.run_forever()
        finally:
            loop.close()
            agent._GUARDS.discard(guard)
            guard.lock.release()

    t = threading.Thread(target=io_thread, daemon=True)
    t.start()
    assert entered.wait(30)
    threading.Timer(0.5, release.set).start()  # the fork starts while the callback runs
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    order.append("forked")
    os.waitpid(pid, 0)
    t.join(30)
    assert order == ["callback done", "forked"]
    assert not guard.lock.locked()


def test_a_fork_goes_ahead_when_the_io_thread_does_not_come_back():
    guard = agent._Guard()
    guard.lock.acquire()  # an I/O thread stuck in a callback
    agent._GUARDS.add(guard)
    try:
        pid = os.fork()  # waits FORK_WAIT_S, then forks all the same (fail open)
        if pid == 0:
            os._exit(0)
        assert os.waitpid(pid, 0)[1] == 0
    finally:
        agent._GUARDS.discard(guard)
        guard.lock.release()
