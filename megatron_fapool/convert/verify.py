"""``verify A B``: two checkpoints of any kind hold the same model — tensor by tensor, and on a probe batch.

1. **Tensors.** Both sides are read into canonical form (the inverse of each format's
   mapping), and every tensor is compared: shape, dtypes, max ``|a - b|`` and a checksum
   of B's bytes. Every tensor of B must equal A's bitwise (A's cast to B's dtype where an
   export cast on request): a conversion is a re-layout, never an approximation.
2. **Probe.** Each side is loaded from its files alone in a fresh process (ours and
   distributed checkpoints by :mod:`.probe`, Hugging Face folders by :mod:`.probe_hf`,
   which imports only transformers) and runs the same rows: fp32 logits within
   ``tolerance`` relative to the largest reference logit (1e-5 for fp32 weights, 2.5e-2
   for bf16/fp16) and identical greedy tokens.

Exit status of the CLI: 0 when both pass, 1 when one fails.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

import torch

from ..config import ConfigError
from ..runtime.local import world_of_one
from .canonical import ModelCard, resolved_model

__all__ = ["Report", "compare_cards", "compare_tensors", "probe_rows", "run_probe", "verify"]

TOLERANCE = {"float32": 1e-5, "bfloat16": 2.5e-2, "float16": 2.5e-2}


@dataclass
class Report:
    lines: list[str] = field(default_factory=list)
    ok: bool = True
    max_diff: float = 0.0
    logits_rel: float | None = None
    greedy_equal: bool | None = None

    def add(self, line: str) -> None:
        self.lines.append(line)

    def fail(self, line: str) -> None:
        self.ok = False
        self.lines.append("FAIL: " + line)

    def text(self) -> str:
        return "\n".join(self.lines)


def compare_cards(a: ModelCard, b: ModelCard) -> list[str]:
    la, lb = resolved_model(a.lm()), resolved_model(b.lm())
    diffs = [f"{k}: {la.get(k)!r} vs {lb.get(k)!r}" for k in sorted(set(la) | set(lb)) if la.get(k) != lb.get(k)]
    if a.attention.get("kind") != b.attention.get("kind"):
        diffs.append(f"attention: {a.attention} vs {b.attention}")
    return diffs


def _checksum(t: torch.Tensor) -> str:
    t = t.detach().contiguous().cpu()
    return "sha256:" + hashlib.sha256(t.view(torch.uint8).numpy().tobytes()).hexdigest()[:16]


def compare_tensors(wa: dict, wb: dict, report: Report, *, max_rows: int = 60) -> None:
    """The per-tensor table into ``report``; a missing/unexpected/differing-shape tensor fails it."""
    names = sorted(set(wa) | set(wb))
    width = min(max(len(n) for n in names), 64) if names else 10
    report.add(f"{'tensor':<{width}}  {'shape':<16} {'dtype A':<9} {'dtype B':<9} {'max|A-B|':>10}  checksum (B)")
    missing = [n for n in names if n not in wb]
    unexpected = [n for n in names if n not in wa]
    differing, elements, nbytes, shown = 0, 0, 0, 0
    for n in names:
        if n not in wa or n not in wb:
            continue
        a, b = wa[n], wb[n]
        if a.shape != b.shape:
            report.fail(f"{n}: shape {tuple(a.shape)} vs {tuple(b.shape)}")
            continue
        d = float((a.double() - b.double()).abs().max()) if a.numel() else 0.0
        bitwise = torch.equal(a.to(b.dtype), b)  # a cast (--dtype) must be exactly the cast of A
        if not bitwise:
            differing += 1
            if differing <= 4:
                report.fail(f"{n}: not equal to A" + (f" cast to {b.dtype}" if a.dtype != b.dtype else "")
                            + f" (max|A-B| {d:.3e})")
        report.max_diff = max(report.max_diff, d)
        elements += b.numel()
        nbytes += b.numel() * b.element_size()
        if shown < max_rows:
            report.add(f"{n[-width:]:<{width}}  {str(tuple(b.shape)):<16} {str(a.dtype)[6:]:<9} {str(b.dtype)[6:]:<9}"
                       f" {d:>10.3e}  {_checksum(b)}")
            shown += 1
    if shown < len(names) - len(missing) - len(unexpected):
        report.add(f"... {len(names) - len(missing) - len(unexpected) - shown} more tensors (all compared)")
    report.add(f"summary: {len(names) - len(missing) - len(unexpected)} tensors, {elements:,} elements,"
               f" {nbytes / 1e6:.2f} MB; {len(missing)} missing in B, {len(unexpected)} only in B,"
               f" {differing} not bitwise equal, max|A-B| {report.max_diff:.3e}")
    if missing:
        report.fail(f"missing in B: {missing[:4]}")
    if unexpected:
        report.fail(f"only in B: {unexpected[:4]}")


def probe_rows(card: ModelCard, spec: str = "2x37,1x256", seed: int = 0) -> list[torch.Tensor]:
    """``"2x37,1x256"``: two rows of 37 tokens and one of 256 (capped at max positions), byte-tokenizer ids."""
    lm = card.lm()
    limit = min(lm.vocab_size, 257)
    g = torch.Generator().manual_seed(seed)
    rows = []
    try:
        for part in spec.split(","):
            count, length = (int(x) for x in part.lower().split("x"))
            for _ in range(count):
                rows.append(torch.randint(0, limit, (min(length, lm.max_position_embeddings - 16),), generator=g))
    except ValueError:
        raise ConfigError("--probe-tokens", f"{spec!r}: expected rows like 2x37,1x256") from None
    return rows


def run_probe(kind: str, path: str, rows, *, tag=None, greedy: int, token_limit: int, timeout: float = 900,
              device: str = "cpu") -> dict:
    """Probe ``path`` in a fresh process; its result dict (``logits``, ``greedy``)."""
    path = os.path.abspath(path)
    with tempfile.TemporaryDirectory(prefix="fapool-probe-") as tmp:
        tokens, out = os.path.join(tmp, "tokens.pt"), os.path.join(tmp, "out.pt")
        torch.save(list(rows), tokens)
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        if kind == "hf":
            import json

            # a copy in the scratch folder: run from here, the package's folder would come first on sys.path
            script = shutil.copy(os.path.join(os.path.dirname(os.path.abspath(__file__)), "probe_hf.py"), tmp)
            cmd = [sys.executable, script, path, tokens, out, "--greedy", str(greedy), "--token-limit",
                   str(token_limit), "--device", device]
            with open(os.path.join(path, "config.json")) as f:
                if "auto_map" in json.load(f):
                    cmd.append("--trust-remote-code")
            env.pop("PYTHONPATH", None)
            cwd = tmp  # not the checkout: the process must not find this package by its working directory
        else:
            cmd = [sys.executable, "-m", "megatron_fapool.convert.probe", path, tokens, out, "--greedy", str(greedy),
                   "--token-limit", str(token_limit), "--device", device] + (["--tag", tag] if tag else [])
            cwd = None
        proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"probe of {path} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        return torch.load(out)


def verify(a, b, *, probe: str = "2x37,1x256", greedy: int = 8, tolerance: float | None = None,
           device: str = "cpu", say=print) -> Report:
    """Compare sources ``a`` and ``b`` (:class:`.sources.Source`); the report (``ok``) and its lines printed."""
    report = Report()
    report.add(f"A: {a.kind} {a.path}" + (f" ({a.detail.get('tag')})" if a.kind == "ours" else ""))
    report.add(f"B: {b.kind} {b.path}" + (f" ({b.detail.get('tag')})" if b.kind == "ours" else ""))
    diffs = compare_cards(a.card, b.card)
    if diffs:
        report.fail("the models differ: " + "; ".join(diffs[:4]))
        say(report.text())
        return report
    with world_of_one("cpu"):
        wa, wb = a.weights(), b.weights()
    compare_tensors(wa, wb, report)
    del wa, wb
    if probe:
        rows = probe_rows(a.card, probe)
        limit = min(a.card.lm().vocab_size, 257)
        ra = run_probe(a.kind, a.path, rows, tag=a.detail.get("tag"), greedy=greedy, token_limit=limit, device=device)
        rb = run_probe(b.kind, b.path, rows, tag=b.detail.get("tag"), greedy=greedy, token_limit=limit, device=device)
        dtype = a.card.dtype if a.card.dtype != "float32" else b.card.dtype
        tol = tolerance if tolerance is not None else TOLERANCE[dtype]
        ref = max(float(x.abs().max()) for x in ra["logits"])
        diff = max(float((x - y).abs().max()) for x, y in zip(ra["logits"], rb["logits"]))
        report.logits_rel = diff / max(ref, 1e-30)
        agree = sum(int((x.argmax(-1) == y.argmax(-1)).sum()) for x, y in zip(ra["logits"], rb["logits"]))
        total = sum(x.shape[0] for x in ra["logits"])
        report.greedy_equal = ra["greedy"] == rb["greedy"]
        shape = ",".join(f"1x{r.numel()}" for r in rows)
        report.add(f"probe (fresh processes, {device}): rows {shape}: max|dlogits| {diff:.3e}, relative {report.logits_rel:.3e}"
                   f" (tolerance {tol:g}), argmax agree {100.0 * agree / total:.1f}%, greedy {greedy} tokens"
                   f" identical: {'yes' if report.greedy_equal else 'no'}")
        if "class" in rb:
            report.add(f"  B loaded as {rb['class']} ({rb['dtype']}), megatron_fapool imported there: "
                       f"{'yes' if rb['imported_megatron_fapool'] else 'no'}")
        if report.logits_rel > tol:
            report.fail(f"logits differ by {report.logits_rel:.3e} relative (> {tol:g})")
        if not report.greedy_equal:
            report.fail(f"greedy tokens differ: A {ra['greedy']} B {rb['greedy']}")
    report.add("verify: " + ("PASS" if report.ok else "FAIL"))
    say(report.text())
    return report
