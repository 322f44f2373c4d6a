"""A probe batch through a converted model, in a process of its own: logits and greedy tokens.

``python -m megatron_fapool.convert.probe PATH TOKENS.pt OUT.pt [--tag T] [--greedy N] [--token-limit L]``
loads ``PATH`` (a checkpoint of ``launch/train.py`` or a distributed checkpoint) from its
files alone, builds the model at TP 1 (Megatron's ``GPTModel``, the fapool spec) and
writes ``{"logits": [...], "greedy": [...]}`` for the rows of ``TOKENS.pt`` (a list of
1-D token tensors). A Hugging Face folder is probed by :mod:`.probe_hf` instead, with
transformers alone (this package not imported). Greedy decoding re-runs the whole
sequence each step (no cache: the reference) and picks among ids below ``token_limit``
as ``launch/infer.py`` does with its tokenizer.
"""

from __future__ import annotations

import argparse
import sys

import torch

from ..models.gpt import build_gpt_model
from ..runtime.local import world_of_one
from .canonical import run_config_for
from .sources import open_source

__all__ = ["greedy", "logits_of", "probe_rows"]


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    """fp32 logits ``[s, vocab]`` (on the CPU) of one row ``ids`` ``[s]``, on the model's device."""
    device = next(model.parameters()).device
    x = ids.view(1, -1).to(device)
    pos = torch.arange(x.shape[1], device=device).view(1, -1)
    with torch.no_grad():
        return model(x, pos, None).float()[0].cpu()


def greedy(model, ids: torch.Tensor, steps: int, token_limit: int) -> list[int]:
    out = ids.clone()
    new = []
    for _ in range(steps):
        nxt = int(logits_of(model, out)[-1, :token_limit].argmax())
        new.append(nxt)
        out = torch.cat([out, torch.tensor([nxt])])
    return new


def probe_rows(card, weights, rows, *, steps: int, token_limit: int, device=None) -> dict:
    """Build ``card``'s model at TP 1 with ``weights`` (in a world of one) on ``device`` and probe ``rows``."""
    model = build_gpt_model(run_config_for(card), perform_initialization=False)  # every weight is loaded
    missing, unexpected = model.load_state_dict(weights, strict=False)  # _extra_state: nothing to load
    missing = [k for k in missing if not k.endswith("._extra_state")]
    if missing or unexpected:
        raise RuntimeError(f"weights do not fit the model: missing {missing[:4]}, unexpected {unexpected[:4]}")
    model.to(device or "cpu").eval()
    return {"logits": [logits_of(model, r) for r in rows],
            "greedy": [greedy(model, r, steps, token_limit) for r in rows]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("path")
    p.add_argument("tokens")
    p.add_argument("out")
    p.add_argument("--tag", default=None)
    p.add_argument("--greedy", type=int, default=8)
    p.add_argument("--token-limit", type=int, default=None)
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = torch.load(a.tokens)
    with world_of_one(a.device) as device:
        src = open_source(a.path, tag=a.tag)
        if src.kind == "hf":
            raise SystemExit("probe: a Hugging Face folder is probed by probe_hf.py")
        weights = src.weights()
        limit = a.token_limit or src.card.lm().vocab_size
        torch.save(probe_rows(src.card, weights, rows, steps=a.greedy, token_limit=limit, device=device), a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
