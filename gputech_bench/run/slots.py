"""Run items on a fixed set of slots (GPUs): each item once, one item per slot at a time.

A thread per slot takes the next item when its previous one is done, so a slow cell
holds up only its own GPU. The calling (main) thread only waits, in short slices, so
that Ctrl-C reaches it at once; it then tells every slot to stop and waits until each
has stopped and recorded its item.
"""

from __future__ import annotations

import signal
import threading
from typing import Callable, Hashable, TypeVar

Item = TypeVar("Item")
SlotT = TypeVar("SlotT", bound=Hashable)

#: How often the waiting thread looks up, to act on Ctrl-C promptly.
JOIN_SLICE_SECONDS = 0.2


def run_on_slots(
    items: list[Item],
    slots: list[SlotT],
    run_one: Callable[[Item, SlotT], bool],
    stop: threading.Event,
) -> None:
    """Call ``run_one(item, slot)`` for every item; ``run_one`` returns False to stop the rest.

    Raises KeyboardInterrupt after every slot has stopped, when Ctrl-C was pressed, and
    re-raises the first error a slot met (after the others finish their items)."""
    queue = iter(items)
    lock = threading.Lock()
    failures: list[BaseException] = []
    # The main thread waits on this event rather than on Thread.join: a join interrupted by
    # Ctrl-C can mark a thread that is still running as finished (CPython's
    # _wait_for_tstate_lock releases the lock the running thread holds), after which
    # nothing would wait for that slot to stop its worker and record its cell.
    all_done = threading.Event()
    running = len(slots)

    def serve(slot: SlotT) -> None:
        nonlocal running
        try:
            while not stop.is_set():
                with lock:
                    item = next(queue, None) if not stop.is_set() else None
                if item is None:
                    return
                try:
                    if not run_one(item, slot):
                        stop.set()
                except BaseException as error:  # noqa: BLE001 - handed to the main thread
                    failures.append(error)
                    stop.set()
        finally:
            with lock:
                running -= 1
                if running == 0:
                    all_done.set()

    threads = [threading.Thread(target=serve, args=(slot,), name=f"slot {slot}", daemon=True) for slot in slots]
    pressed = _start_holding_ctrl_c(threads)
    try:
        if pressed:
            raise KeyboardInterrupt
        while not all_done.wait(JOIN_SLICE_SECONDS):
            pass
    except KeyboardInterrupt:
        stop.set()
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not orphan workers
        try:
            all_done.wait()
        finally:
            signal.signal(signal.SIGINT, previous)
        raise
    if failures:
        raise failures[0]


def _start_holding_ctrl_c(threads: list[threading.Thread]) -> bool:
    """Start every thread with Ctrl-C held back, so that each slot either runs and counts
    itself done, or never started; returns whether Ctrl-C was pressed meanwhile."""
    pressed = False

    def note(signum: int, frame: object) -> None:
        nonlocal pressed
        pressed = True

    previous = signal.signal(signal.SIGINT, note)
    try:
        for thread in threads:
            thread.start()
    finally:
        signal.signal(signal.SIGINT, previous)
    return pressed
