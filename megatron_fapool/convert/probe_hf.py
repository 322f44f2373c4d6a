"""Probe a Hugging Face model folder with transformers alone: logits and greedy tokens.

Run as a script (``python probe_hf.py HF_DIR TOKENS.pt OUT.pt [--greedy N] [--token-limit L]
[--trust-remote-code]``) in a fresh process: it imports only torch and transformers,
so it shows what a user of the export gets in a process that never imported
megatron_fapool. Logits are computed in the dtype the folder's config records (cast to
fp32 for the comparison); greedy decoding re-runs the whole sequence each step and picks
among ids below ``token_limit``.
"""

import argparse
import sys

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("path")
    p.add_argument("tokens")
    p.add_argument("out")
    p.add_argument("--greedy", type=int, default=8)
    p.add_argument("--token-limit", type=int, default=None)
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    if "megatron_fapool" in sys.modules:
        raise SystemExit("probe_hf: megatron_fapool is imported; this probe must run without it")
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(a.path, trust_remote_code=a.trust_remote_code, dtype="auto")
    model.to(a.device).eval()
    rows = torch.load(a.tokens)
    limit = a.token_limit or model.config.vocab_size

    def logits_of(ids):
        with torch.no_grad():
            return model(input_ids=ids.view(1, -1).to(a.device), use_cache=False).logits.float()[0].cpu()

    out = {"logits": [], "greedy": [], "dtype": str(next(model.parameters()).dtype),
           "class": type(model).__name__, "imported_megatron_fapool": "megatron_fapool" in sys.modules}
    for r in rows:
        out["logits"].append(logits_of(r))
        seq, new = r.clone(), []
        for _ in range(a.greedy):
            nxt = int(logits_of(seq)[-1, :limit].argmax())
            new.append(nxt)
            seq = torch.cat([seq, torch.tensor([nxt])])
        out["greedy"].append(new)
    torch.save(out, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
