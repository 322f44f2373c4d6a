"""The checkpoint converter's commands (``tools/convert_checkpoint.py``): parse, check, convert, verify.

Every command checks all its input first (kinds, completeness, models, layouts, the
output folder) and exits 2 with one ``fapool: error:`` line before anything is written.
Every writing command writes into a staging folder, runs ``verify`` of what it wrote
against its source (unless ``--no-verify``) and only then renames the folder to the
output; a failed check keeps it as ``OUT.failed-<pid>`` and exits 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile

from ..config import ConfigError, load_run_config
import yaml

from .canonical import DTYPES, ModelCard, card_of_run_config
from .deepspeed_io import check_target, dist_to_ours, ours_to_dist, reshard
from .dist import save_weights_dist
from .hf import check_exportable, export_hf, read_hf
from .listing import describe
from .progress import Progress
from .sources import open_source
from .staging import CheckFailed, check_output_free, check_space, staged_output
from .verify import verify

__all__ = ["main", "parser"]

EXAMPLES = """\
examples:
  convert_checkpoint.py inspect runs/ckpt
  convert_checkpoint.py to-dist --load runs/ckpt --save runs/ckpt_dist --optimizer
  convert_checkpoint.py reshard --load runs/ckpt --deepspeed_config configs/tp1.json --save runs/ckpt_tp1
  convert_checkpoint.py export-hf --load runs/ckpt --save runs/hf
  convert_checkpoint.py import-hf --hf runs/hf --deepspeed_config configs/tiny.json --save runs/ckpt_from_hf
  convert_checkpoint.py verify runs/ckpt runs/hf
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="convert_checkpoint.py", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
        description="Convert checkpoints between launch/train.py (DeepSpeed + Megatron), Megatron-Core's distributed"
                    " checkpoint (torch_dist) and Hugging Face, at any TP; every output is verified.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def writer(sp):
        sp.add_argument("--save", required=True, metavar="OUT", help="output folder (must not exist)")
        sp.add_argument("--no-verify", action="store_true", help="skip the verification of what was written")
        sp.add_argument("--probe-tokens", default="2x37,1x256", help="probe rows of the verification (default %(default)s)")
        sp.add_argument("--probe-device", default="cpu", choices=["cpu", "cuda"],
                        help="where the verification's probes run (default %(default)s)")
        sp.add_argument("--quiet", action="store_true", help="no progress lines")

    s = sub.add_parser("inspect", help="kind, layout, dtypes, tensors, bytes, completeness (reads only)")
    s.add_argument("src")
    s.add_argument("--tag", default=None, help="a tag of a launch/train.py checkpoint (default: latest)")
    s.add_argument("--no-tensors", action="store_true", help="no per-tensor listing")

    s = sub.add_parser("to-dist", help="to Megatron-Core's torch_dist distributed checkpoint")
    s.add_argument("--load", required=True, metavar="DIR")
    s.add_argument("--tag", default=None)
    s.add_argument("--optimizer", action="store_true", help="also the fp32 masters, Adam moments, step and LR schedule")
    writer(s)

    s = sub.add_parser("reshard", help="a launch/train.py checkpoint at another TP / DP / ZeRO stage (resumable)")
    s.add_argument("--load", required=True, metavar="DIR", help="a launch/train.py or distributed checkpoint")
    s.add_argument("--tag", default=None)
    s.add_argument("--deepspeed_config", required=True, metavar="NEW.json", help="the run it is for (TP, ZeRO, optimizer)")
    s.add_argument("--yaml-cfg", default=None, help="model YAML replacing the JSON's fapool.model_yaml")
    s.add_argument("--data-parallel-size", type=int, default=None, metavar="N",
                   help="data-parallel replicas of the new run (default: from train_batch_size, else the source's)")
    s.add_argument("--reset-optimizer", action="store_true",
                   help="carry the weights only: fresh Adam moments and step (a control; a resume then diverges)")
    writer(s)

    s = sub.add_parser("export-hf", help="to a Hugging Face folder (safetensors, config, tokenizer)")
    s.add_argument("--load", required=True, metavar="DIR", help="a launch/train.py or distributed checkpoint")
    s.add_argument("--tag", default=None)
    s.add_argument("--hf-arch", default="auto", choices=["auto", "arcee", "llama", "mixtral", "fapool_gpt"])
    s.add_argument("--dtype", default="source", choices=["source", *DTYPES],
                   help="cast the weights (default: keep the checkpoint's dtype)")
    s.add_argument("--max-shard-size", default="5GB", help="safetensors shard size (default %(default)s)")
    writer(s)

    s = sub.add_parser("import-hf", help="a Hugging Face folder to an iteration-0 launch/train.py checkpoint")
    s.add_argument("--hf", required=True, metavar="DIR")
    s.add_argument("--deepspeed_config", required=True, metavar="cfg.json", help="the run it is for (TP, ZeRO, optimizer)")
    s.add_argument("--data-parallel-size", type=int, default=None, metavar="N")
    s.add_argument("--yaml-out", default=None, metavar="PATH",
                   help="where to write the model YAML (default OUT/model.yaml; train with --yaml-cfg it)")
    writer(s)

    s = sub.add_parser("verify", help="two checkpoints of any kind: per-tensor table, probe logits and greedy tokens")
    s.add_argument("a")
    s.add_argument("b")
    s.add_argument("--tag-a", default=None)
    s.add_argument("--tag-b", default=None)
    s.add_argument("--probe-tokens", default="2x37,1x256")
    s.add_argument("--greedy", type=int, default=8)
    s.add_argument("--tolerance", type=float, default=None, help="relative logits tolerance (default by dtype)")
    s.add_argument("--probe-device", default="cpu", choices=["cpu", "cuda"])
    return p


def _size(text: str) -> int:
    t = text.strip().upper()
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if t.endswith(unit):
            try:
                return int(float(t[: -len(unit)]) * scale)
            except ValueError:
                break
    raise ConfigError("--max-shard-size", f"{text!r}: expected a size like 5GB or 500MB")


def _target_config(args, card: ModelCard, *, default_dp: int) -> tuple:
    """The new run's config and data-parallel size; its model must be the checkpoint's (the ``--load`` of
    launch/train.py checks the same), all checked before any process starts."""
    cfg = load_run_config(args.deepspeed_config, model_yaml=getattr(args, "yaml_cfg", None))
    dp = check_target(card, cfg, data_parallel_size=args.data_parallel_size, default_dp=default_dp)
    return cfg, dp


def _checkpoint_bytes(src) -> int:
    """Bytes of a source's files (weights and optimizer state; of its one tag for a launch/train.py checkpoint)."""
    root = src.ours.path if src.ours is not None else src.path
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(root) for f in files)


def _model_bytes(src) -> int:
    return sum(os.path.getsize(f) for f in src.ours.model_files())


def _verified(src, out: str, args, progress: Progress) -> None:
    """Verify what was written (the staging folder) against its source; a failure raises CheckFailed."""
    if args.no_verify:
        progress.say("verification skipped (--no-verify)")
        return
    with progress.phase("verifying the output against its source"):
        report = verify(src, open_source(out), probe=args.probe_tokens, device=args.probe_device, say=progress.say)
    if not report.ok:
        raise CheckFailed("verification failed")


def _cmd_inspect(args) -> int:
    print(describe(open_source(args.src, tag=args.tag), tensors=not args.no_tensors))
    return 0


def _cmd_to_dist(args) -> int:
    src = open_source(args.load, tag=args.tag, key="--load")
    if src.kind != "ours":
        raise ConfigError("--load", f"{args.load} is a {src.kind} checkpoint: to-dist converts launch/train.py checkpoints")
    check_output_free(args.save)
    check_space(args.save, _checkpoint_bytes(src) if args.optimizer else _model_bytes(src))
    progress = Progress(3, quiet=args.quiet)
    with staged_output(args.save, say=progress.say) as stage:
        ours_to_dist(src.ours, stage, optimizer=args.optimizer, progress=progress)
        _verified(src, stage, args, progress)
    progress.say(f"wrote {args.save}: load it with megatron.core.dist_checkpointing (Megatron-LM: --load"
                 f" {args.save} --ckpt-format torch_dist --dist-ckpt-strictness log_all)")
    progress.summary()
    return 0


def _cmd_reshard(args) -> int:
    src = open_source(args.load, tag=args.tag, key="--load")
    if src.kind == "hf":
        raise ConfigError("--load", f"{args.load} is a Hugging Face folder: use import-hf")
    cfg, dp = _target_config(args, src.card, default_dp=src.detail.get("dp") or 1)
    check_output_free(args.save)
    check_space(args.save, 2 * _checkpoint_bytes(src))  # the staging dist checkpoint and the output
    optimizer = "reset" if args.reset_optimizer else "carry"
    progress = Progress(3 if src.kind == "ours" else 2, quiet=args.quiet)
    with staged_output(args.save, say=progress.say) as stage:
        if src.kind == "ours":
            with tempfile.TemporaryDirectory(prefix="fapool-reshard-",
                                             dir=os.path.dirname(os.path.abspath(args.save))) as tmp:
                reshard(src.ours, cfg, stage, staging=os.path.join(tmp, "dist"), optimizer=optimizer,
                        data_parallel_size=dp, progress=progress)
        else:
            dist_to_ours(src.path, cfg, stage, optimizer=optimizer, data_parallel_size=dp, progress=progress)
        _verified(src, stage, args, progress)
    progress.say(f"wrote {args.save}: resume with launch/train.py --load {args.save} --deepspeed_config"
                 f" {args.deepspeed_config} ({cfg.tensor_model_parallel_size * dp} base ranks)")
    progress.summary()
    return 0


def _cmd_export_hf(args) -> int:
    src = open_source(args.load, tag=args.tag, key="--load")
    if src.kind == "hf":
        raise ConfigError("--load", f"{args.load} is a Hugging Face folder already")
    arch = check_exportable(src.card, args.hf_arch)
    dtype = None if args.dtype == "source" else args.dtype
    shard = _size(args.max_shard_size)
    check_output_free(args.save)
    progress = Progress(3, quiet=args.quiet)
    with progress.phase(f"reading {src.kind} checkpoint {src.path}"):
        weights = src.weights(progress=progress)
    check_space(args.save, sum(t.numel() * t.element_size() for t in weights.values()))
    with staged_output(args.save, say=progress.say) as stage:
        with progress.phase(f"writing Hugging Face {arch} to {args.save}"):
            export_hf(src.card, weights, stage, arch=arch, dtype=dtype, max_shard_bytes=shard, progress=progress)
        del weights
        _verified(src, stage, args, progress)
    remote = arch == "fapool_gpt"
    progress.say(f"wrote {args.save} ({arch}): AutoModelForCausalLM.from_pretrained({args.save!r}"
                 + (", trust_remote_code=True" if remote else "") + ")")
    progress.summary()
    return 0


def _cmd_import_hf(args) -> int:
    src = open_source(args.hf, key="--hf")
    if src.kind != "hf":
        raise ConfigError("--hf", f"{args.hf} is a {src.kind} checkpoint, not a Hugging Face folder")
    check_output_free(args.save)
    yaml_out = os.path.abspath(args.yaml_out or os.path.join(args.save, "model.yaml"))
    progress = Progress(4, quiet=args.quiet)
    with tempfile.TemporaryDirectory(prefix="fapool-import-") as tmp:
        # the config the run will have: the JSON with the imported model's YAML
        tmp_yaml = os.path.join(tmp, "model.yaml")
        with open(tmp_yaml, "w") as f:
            yaml.safe_dump({"language_model": src.card.language_model}, f, sort_keys=False)
        cfg = load_run_config(args.deepspeed_config, model_yaml=tmp_yaml)
        want = card_of_run_config(cfg).dtype  # the run trains in the JSON's precision
        dp = check_target(dataclasses.replace(src.card, dtype=want), cfg, data_parallel_size=args.data_parallel_size)
        with staged_output(args.save, say=progress.say) as stage:
            with progress.phase(f"reading Hugging Face {args.hf}"):
                card, weights = read_hf(args.hf)
                for t in weights.values():
                    progress.add(t.numel() * t.element_size())
            if want != card.dtype:
                progress.say(f"the weights are {card.dtype}, {args.deepspeed_config} trains in {want}: cast to {want}")
                weights = {k: v.to(DTYPES[want]) if v.is_floating_point() else v for k, v in weights.items()}
                card.dtype = want
            dist_dir = os.path.join(tmp, "dist")
            with progress.phase("writing the distributed checkpoint (staging)"):
                save_weights_dist(card, weights, dist_dir, source={"kind": "hf", "path": os.path.abspath(args.hf)})
            del weights
            dist_to_ours(dist_dir, cfg, stage, data_parallel_size=dp, optimizer="reset", progress=progress)
            if args.yaml_out is None:
                shutil.copyfile(tmp_yaml, os.path.join(stage, "model.yaml"))
            _verified(src, stage, args, progress)
        if args.yaml_out is not None:  # once the checkpoint is committed
            shutil.copyfile(tmp_yaml, yaml_out)
    progress.say(f"wrote {args.save} (iteration 0): train with launch/train.py --load {args.save} --deepspeed_config"
                 f" {args.deepspeed_config} --yaml-cfg {yaml_out}; serve with launch/infer.py --load {args.save}"
                 f" --deepspeed_config {args.deepspeed_config} --yaml-cfg {yaml_out}")
    progress.summary()
    return 0


def _cmd_verify(args) -> int:
    a = open_source(args.a, tag=args.tag_a, key="A")
    b = open_source(args.b, tag=args.tag_b, key="B")
    return 0 if verify(a, b, probe=args.probe_tokens, greedy=args.greedy, tolerance=args.tolerance,
                       device=args.probe_device).ok else 1


COMMANDS = {"inspect": _cmd_inspect, "to-dist": _cmd_to_dist, "reshard": _cmd_reshard, "export-hf": _cmd_export_hf,
            "import-hf": _cmd_import_hf, "verify": _cmd_verify}


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except CheckFailed as e:
        print(f"fapool: error: {e}", file=sys.stderr, flush=True)
        return 1
