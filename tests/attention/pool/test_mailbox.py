"""The shared serving pool's mailboxes: headers from any base rank, in arrival order, through a real store.

The ops behind them run in tests/inference/test_shared_serving.py and tests/launch/test_infer.py.
"""

import threading

import torch.distributed as dist

from megatron_fapool.attention.pool.mailbox import DECODE, PREFILL, Mailboxes
from megatron_fapool.parallel.service import Header


def test_headers_arrive_in_order_from_any_sender_and_are_deleted_once_read():
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    boxes = Mailboxes(store)
    sent = [(0, Header(op=PREFILL, n=749, member=1, slot=3, layer=2, scale_bits=-5)), (2, Header(op=DECODE, n=4))]
    for sender, h in sent:
        boxes.post(7, sender, h)
    assert [boxes.take(7, i) for i in range(2)] == sent
    assert not store.check([f"{Mailboxes.PREFIX}/7/0", f"{Mailboxes.PREFIX}/7/1"])  # read once, then gone

    # a pool rank waiting on its next header gets it when a base posts it later
    got = []
    pool_side = Mailboxes(dist.TCPStore("127.0.0.1", store.port, is_master=False))  # its own connection, as a rank's
    reader = threading.Thread(target=lambda: got.append(pool_side.take(7, 2)))
    reader.start()
    boxes.post(5, 1, Header(op=DECODE, n=1))  # another pool rank's queue does not wake it
    boxes.post(7, 1, Header(op=DECODE, n=2))
    reader.join(timeout=30)
    assert got == [(1, Header(op=DECODE, n=2))]
    assert boxes.take(5, 0) == (1, Header(op=DECODE, n=1))
