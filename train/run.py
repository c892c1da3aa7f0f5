"""Reproduce the shipped checkpoint from scratch: data -> stages -> checkpoint -> evaluation -> CARD.md.

    python -m retrv.train.run OUT [--minutes 50] [--seed 0]

The schedule (steps per stage) is a fixed function of `--minutes`, sized from per-step costs measured on an idle
2-core CPU, never from a clock: the same seed and minutes train the same model (a busier machine only takes
longer). One torch thread, single-threaded data order, seeded everything.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from retrv.train.cot import INSPECT_ORDERS

FLICKR_DEFAULT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "flickr8k-1k"


@dataclass(frozen=True)
class DataSizes:
    n_train: int = 2000  # run 1 trained on 600 scenes (1,200 queries) and its reranker memorised them: GRPO rollouts
    # were right on 0.6 of training windows and on chance of validation ones. Scenes are cheap (37 s for 2,000).
    n_val: int = 50
    n_test: int = 200  # 400 queries over 1,600 candidates: R@1 to about +-2.5 points (one standard error)
    max_objects: int = 3  # objects per scene (synth: 1 to this)


# Seconds per step of each stage on an idle 2-core CPU at the default sizes (measured; see CARD.md), and the share
# of the budget each stage gets. GRPO steps are dominated by sampling (the runtime's decode loop).
STEP_SECONDS = {"vision": 0.3, "pretrain": 1.0, "sft_full": 0.6, "align": 0.35, "sft_icm": 0.6, "grpo": 3.0}
SHARES = {"vision": 0.10, "pretrain": 0.30, "sft_full": 0.08, "align": 0.05, "sft_icm": 0.33, "grpo": 0.12}
FIXED_MINUTES = 9.0  # data generation, token caching, coarse rankings, export and evaluation


def parse_shares(text: str) -> dict[str, float]:
    """'pretrain=0.2,sft_icm=0.45' -> SHARES with those stages replaced (the shares may sum to at most 1; the
    defaults sum to 0.98)."""
    out = dict(SHARES)
    for part in filter(None, text.split(",")):
        name, _, value = part.partition("=")
        if name not in SHARES:
            raise ValueError(f"--shares: got stage {name!r}; expected one of {sorted(SHARES)}")
        out[name] = float(value)
    if sum(out.values()) > 1.0 + 1e-6 or min(out.values()) <= 0:
        raise ValueError(f"--shares: got {out} (sum {sum(out.values()):.3f}); expected positive shares summing to "
                         "at most 1")
    return out


def schedule_for(minutes: float, shares: dict[str, float] | None = None):
    from retrv.train.stages import Schedule, StageConfig

    shares = shares or SHARES
    train_s = max(0.0, minutes - FIXED_MINUTES) * 60
    steps = {k: max(1, int(train_s * shares[k] / STEP_SECONDS[k])) for k in SHARES}
    return Schedule(
        vision=StageConfig(steps["vision"], lr=2e-3, batch=64, embed_batch=0, warmup=min(50, steps["vision"])),
        pretrain=StageConfig(steps["pretrain"], lr=1e-3, batch=32, embed_batch=16, warmup=min(50, steps["pretrain"])),
        sft_full=StageConfig(steps["sft_full"], lr=5e-4, batch=8, embed_batch=8, warmup=min(20, steps["sft_full"])),
        align=StageConfig(steps["align"], lr=1e-3, batch=8, embed_batch=0, warmup=min(10, steps["align"])),
        sft_icm=StageConfig(steps["sft_icm"], lr=5e-4, batch=8, embed_batch=8, warmup=min(20, steps["sft_icm"])),
        grpo=StageConfig(steps["grpo"], lr=2e-5, batch=2, embed_batch=8, warmup=min(5, steps["grpo"])),
    )


def generate_data(out: Path, seed: int, sizes: DataSizes) -> dict:
    from retrv.train.synth import generate_dataset

    return generate_dataset(out, seed=seed, n_train=sizes.n_train, n_val=sizes.n_val, n_test=sizes.n_test,
                            max_objects=sizes.max_objects, overwrite=True)


def _params(model) -> dict:
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return {"total": count(model), "language_model": count(model.language_model), "visual": count(model.visual),
            "icm": count(model.icm), "lm_head": count(model.lm_head)}


def _verdict(syn: dict) -> list[str]:
    w, wo = syn["with_inspection"]["all"], syn["without_inspection"]["all"]
    c, r0, r1 = w["coarse"]["recall@1"], wo["reranked"]["recall@1"], w["reranked"]["recall@1"]
    n = w["queries"]
    se = lambda p: (p * (1 - p) / max(1, n)) ** 0.5  # noqa: E731
    out = ["What this shows (one run, one seed; a standard error on R@1 here is about "
           f"{100 * se(max(c, r1)):.1f} points):", ""]
    out.append(f"- Reranking vs the coarse stage: R@1 {100 * c:.1f} -> {100 * r1:.1f} "
               f"({100 * (r1 - c):+.1f} points) with inspection, {100 * r0:.1f} ({100 * (r0 - c):+.1f}) without.")
    out.append(f"- Details inspection: R@1 {100 * r0:.1f} without -> {100 * r1:.1f} with ({100 * (r1 - r0):+.1f} "
               "points), " + ("as the paper's ablation found." if r1 > r0 + 2 * se(r1) else
                              "NOT a clear gain at this sample size: the paper's ablation does not reproduce here."))
    return out


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"got {value}; expected a number of targets >= 0 (0: the whole split)")
    return value


def reproduce_command(args) -> str:
    """The command that trains this model again into model/default: every option that differs from its default."""
    out = f"python -m retrv.train.run model/default --minutes {args.minutes:g} --seed {args.seed}"
    if args.max_objects != DataSizes.max_objects:
        out += f" --max-objects {args.max_objects}"
    if args.inspect_order != "survivors":
        out += f" --inspect-order {args.inspect_order}"
    if args.window_block:
        out += f" --window-block {args.window_block}"
    if args.probe_position:
        out += " --probe-position"
    changed = {k: v for k, v in args.shares.items() if v != SHARES[k]}
    if changed:
        out += " --shares " + ",".join(f"{k}={v:g}" for k, v in changed.items())
    return out


def _check_out(ap: argparse.ArgumentParser, args) -> None:
    """Refuse, before any training, an output the final `rmtree(out)` + save would wrongly replace: a folder that
    is not a checkpoint, a file, the --flickr folder, or a folder holding --work (the data and pack being used)."""
    import os

    from retrv.runtime.errors import InputError
    from retrv.runtime.outputs import check_output

    try:
        check_output(args.out, "checkpoint", {"the --flickr folder": args.flickr or None})
        if args.work and args.out.strip():
            work, out = Path(os.path.realpath(args.work)), Path(os.path.realpath(args.out))
            if work == out or out in work.parents:
                raise InputError(f"checkpoint {args.out!r}: is or contains the --work folder {args.work!r}, which "
                                 f"it would delete when saved; expected a checkpoint directory outside it")
    except InputError as e:
        ap.error(str(e))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m retrv.train.run", description=__doc__.splitlines()[0])
    ap.add_argument("out", help="checkpoint directory to write (e.g. model/default)")
    ap.add_argument("--minutes", type=float, default=50.0, help="budget the schedule is sized for (idle 2-core CPU)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default=None, help="folder for data, pack and indexes (default: a temporary folder)")
    ap.add_argument("--flickr", default=str(FLICKR_DEFAULT),
                    help="Flickr8k folder for the photo evaluation ('' = skip)")
    ap.add_argument("--flickr-queries", type=int, default=500)
    ap.add_argument("--skip-eval", action="store_true")
    ap.add_argument("--max-objects", type=int, default=DataSizes.max_objects, choices=(1, 2, 3),
                    help="objects per scene in the generated data (1 to this)")
    ap.add_argument("--shares", default="", type=parse_shares,
                    help="budget share per stage, e.g. 'pretrain=0.2,sft_icm=0.45' (the rest keep their defaults)")
    ap.add_argument("--inspect-order", choices=INSPECT_ORDERS, default="survivors",
                    help="what the CoT's phase 3 inspects: phase 2's survivors, or every candidate in coarse order")
    ap.add_argument("--window-block", type=_non_negative, default=0,
                    help="rank each training query among this many targets' pools (e.g. 200, the test split's "
                         "size) rather than the whole training corpus (0)")
    ap.add_argument("--probe-position", action="store_true",
                    help="the vision tower's dense probe also asks each merged token for its object's position")
    for split in ("train", "val", "test"):  # smaller data for smoke runs; the shipped model uses the defaults
        ap.add_argument(f"--n-{split}", type=int, default=getattr(DataSizes, f"n_{split}"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    _check_out(ap, args)
    if args.flickr and not args.skip_eval:  # checked now, not after the training it would otherwise end
        from retrv.runtime.errors import InputError
        from retrv.train.flickr8k import read_captions

        try:
            read_captions(args.flickr)
        except InputError as e:
            ap.error(f"--flickr: {e} (--flickr '' skips the photo evaluation)")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    import numpy as np
    import torch

    from retrv.runtime.inputs.preprocess import ImageProcessorConfig
    from retrv.runtime.inputs.prompt import PromptTokenizer
    from retrv.train.checkpoint import MAX_PIXELS, MIN_PIXELS, ModelSize, new_model, save_checkpoint
    from retrv.train.data import ImageBank, load_split
    from retrv.train.stages import Trainer
    from retrv.train.tokenizer import VOCAB_SIZE, build_tokenizer

    t_start = time.perf_counter()
    say = lambda msg: print(f"[{(time.perf_counter() - t_start) / 60:5.1f} min] {msg}", flush=True)  # noqa: E731
    # One intra-op thread: bit-for-bit deterministic (no parallel reductions), and on a shared machine two
    # threads that wait on each other's barriers ran 3-15x slower per step than one (measured, see CARD.md).
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    out = Path(args.out)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="retrv-train-"))
    work.mkdir(parents=True, exist_ok=True)
    sizes, size = DataSizes(args.n_train, args.n_val, args.n_test, args.max_objects), ModelSize()
    schedule = replace(schedule_for(args.minutes, args.shares), inspect_order=args.inspect_order,
                       window_block=args.window_block, probe_position=args.probe_position)
    say(f"work folder {work}; schedule " + ", ".join(f"{k} {v['steps']}" for k, v in schedule.to_dict().items()
                                                       if isinstance(v, dict)))

    data = work / "data"
    manifest = generate_data(data, args.seed, sizes)
    say("data: " + ", ".join(f"{s} {manifest['splits'][s]['n_queries']} queries" for s in ("train", "val", "test")))
    train, val = load_split(data, "train"), load_split(data, "val")
    tok_raw, ids = build_tokenizer([q.query_txt for q in train.queries] + [r.caption for r in train.scenes.values()])
    tokenizer = PromptTokenizer.from_tokenizer(tok_raw)
    model = new_model(size, ids, VOCAB_SIZE, args.seed)
    params = _params(model)
    say(f"model: {params['total'] / 1e6:.2f} M parameters")
    bank = ImageBank(ImageProcessorConfig(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS))
    bank.add_split(train)
    bank.add_split(val)

    trainer = Trainer(model, tokenizer, train, val, bank, schedule, args.seed, report=say)
    for stage in ("pretrain_vision", "pretrain", "sft_full", "align", "sft_icm", "grpo"):
        say(f"stage {stage}")
        getattr(trainer, stage)()
        if stage == "sft_full":
            trainer.validate(stage, inspect_budgets=(0,), use_icm=False)
        elif stage in ("sft_icm", "grpo"):
            trainer.validate(stage)

    config = {"minutes": args.minutes, "seed": args.seed, "shares": args.shares, "size": size.to_dict(),
              "data": asdict(sizes), "command": reproduce_command(args),
              "schedule": schedule.to_dict()}
    record = {"config": config, "params": params, "stages": trainer.history,
              "machine": f"a 2-core {platform.machine()} CPU (1 torch thread), torch {torch.__version__}"}
    if out.exists():
        shutil.rmtree(out)
    saved = save_checkpoint(model.eval(), tok_raw, ids, size, out, extra=record)
    record["weights_mb"] = (saved.files["model.safetensors"] + saved.files["icm.safetensors"]) / 1e6
    say(f"saved {out} ({record['weights_mb']:.1f} MB of weights)")

    if not args.skip_eval:
        from retrv.export.pack_export import export_pack
        from retrv.train.evaluation import K, evaluate_flickr, evaluate_synthetic

        pack = export_pack(out, work / "pack")
        ev = {"k": K, "synthetic_candidates": manifest["splits"]["test"]["n_candidates"]}
        ev["synthetic"] = evaluate_synthetic(pack, data, work, report=say)
        if args.flickr:
            ev["flickr8k"] = evaluate_flickr(pack, Path(args.flickr), work, args.flickr_queries, args.seed, report=say)
        record["evaluation"] = ev
        record["verdict"] = _verdict(ev["synthetic"])
    record["wall_minutes"] = (time.perf_counter() - t_start) / 60
    (out / "training.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    if "evaluation" in record:
        from retrv.train.card import synthetic_table, write_card

        write_card(out, record)
        print("\n".join(synthetic_table(record["evaluation"]["synthetic"])))
        print("\n".join(record["verdict"]))
    say(f"done: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
