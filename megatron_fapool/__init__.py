"""megatron_fapool: long-context training and inference on Megatron-Core and DeepSpeed.

Subpackages, bottom up; imports only point down this list (``tests/test_layering.py``
checks it, docs/design.md §6 draws it):

0. ``config`` — the ``fapool`` section, the model YAML, the calibration file;
1. ``parallel`` — ranks and roles, process groups, the serving transport, liveness;
2. ``attention.kernels`` — single-device attention that returns the LSE;
3. ``attention.dilated`` — LongNet dilated attention over the kernels;
4. ``attention.pool`` — the pooled algorithms (one file each) and the resource manager;
5. ``attention`` (the Megatron core-attention module), ``models`` (layer specs, RoPE);
6. ``data``, ``training``, ``inference``;
7. ``runtime`` (the start-up every entry point shares), ``testing``.

One word per concept:

- *base / pool / expert rank*: the roles of :mod:`.parallel.roles`; a *member* is a rank
  of an attention group, the base rank being member 0.
- *local*: on this rank alone, no other rank involved (the single-device kernels; a
  *local call* is one the pool did not join).
- *chunk*: a contiguous part of the query rows that one kernel call computes (the ``2P``
  zigzag chunks of a pooled dense call; the row chunks of the math kernel and of
  dilated stacks); its ``[lo, hi)`` bounds are its *span*.
- *piece*: a run of rows moved or computed as one unit — K/V rows sent in one message,
  one key split of a decode call.
- *shard*: a member's contiguous range of a request's K/V (inference).
- *segment*: a dilated branch's run of ``w`` tokens; *block*: a dense sub-problem the
  dilated code hands to a kernel (the rest of dilated attention's words:
  :mod:`.attention.dilated`).
- *step*: one training iteration or one decode forward; *call*: one layer's attention
  in a step.
"""
